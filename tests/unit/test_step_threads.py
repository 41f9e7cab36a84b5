"""The per-step thread count: measured per size class of step, on a fake clock."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from actors.shard.step_threads import REVISIT, SAMPLES, StepThreads, size_class


class Box:
    """A fake worker: each step's cycle (step + what follows it) costs `cost(threads, tokens)` seconds."""

    def __init__(self, most: int, cost: Callable[[int, int], float]) -> None:
        self.now = 0.0
        self.cost = cost
        self.policy = StepThreads(most, clock=lambda: self.now)
        self.plays: list[int] = []

    def run(self, steps: int, tokens: int) -> list[int]:
        """Play `steps` steps of `tokens` tokens; the thread counts they ran on."""
        start = len(self.plays)
        for _ in range(steps):
            threads = self.policy.choose(tokens)
            self.plays.append(threads)
            self.now += self.cost(threads, tokens)
        return self.plays[start:]


def test_size_classes_are_powers_of_two() -> None:
    assert [size_class(n) for n in (0, 1, 2, 3, 4, 15, 16, 31, 32)] == [1, 1, 2, 2, 3, 4, 5, 5, 6]


def test_small_steps_that_a_second_thread_slows_run_on_one() -> None:
    # a tiny model under load: the second thread's step is shorter, but the serving processes lose their core
    box = Box(2, lambda threads, tokens: {1: 0.006, 2: 0.009}[threads])
    plays = box.run(200, 16)
    assert plays[:3] == [2, 2, 2]  # all threads are measured first: that is how the worker ran before
    assert plays[100:].count(2) <= 100 // REVISIT + 1  # after that only the revisits
    assert box.policy.picks() == {"16-31": 1}


def test_a_clear_win_for_more_threads_keeps_them() -> None:
    box = Box(2, lambda threads, tokens: {1: 0.010, 2: 0.006}[threads])
    plays = box.run(200, 8)
    assert plays[:12].count(1) <= 4  # measured a few times
    assert plays[50:].count(1) <= 150 // REVISIT + 1
    assert box.policy.picks() == {"8-15": 2}


def test_a_near_tie_goes_to_fewer_threads() -> None:
    box = Box(2, lambda threads, tokens: {1: 0.0100, 2: 0.0098}[threads])  # 2% apart: less than the margin
    assert box.run(200, 4)[100:].count(1) >= 95


def test_long_steps_never_leave_every_thread() -> None:
    # a real model's decode step: compute-bound, nothing to measure; a slow single-thread step costs real time
    box = Box(2, lambda threads, tokens: {1: 0.090, 2: 0.055}[threads])
    assert set(box.run(300, 16)) == {2}


def test_slow_tokens_never_leave_every_thread() -> None:
    # a real model's decode step of one sequence: short, but each token costs far more than serving it
    box = Box(2, lambda threads, tokens: {1: 0.034, 2: 0.022}[threads])
    assert set(box.run(300, 1)) == {2}


def test_each_size_class_learns_its_own_count() -> None:
    box = Box(2, lambda threads, tokens: 0.0005 * tokens * (1.0 if threads == 1 else 0.55 if tokens >= 64 else 1.3))
    box.run(80, 4)
    box.run(80, 128)
    assert box.policy.picks() == {"4-7": 1, "128-255": 2}


def test_a_change_of_load_moves_the_pick() -> None:
    slow_second_thread = [True]
    box = Box(2, lambda threads, tokens: 0.006 if threads == 1 else (0.009 if slow_second_thread[0] else 0.003))
    box.run(100, 16)
    assert box.policy.picks() == {"16-31": 1}
    slow_second_thread[0] = False  # the serving processes went quiet
    box.run(REVISIT * (SAMPLES + 1), 16)
    assert box.policy.picks() == {"16-31": 2}
    assert box.run(20, 16).count(2) >= 19


def test_candidate_counts() -> None:
    assert StepThreads(1).counts == [1]
    assert StepThreads(4).counts == [1, 2, 4]
    assert StepThreads(6).counts == [1, 2, 4, 6]
    assert Box(1, lambda threads, tokens: 0.001).run(50, 16) == [1] * 50


def test_no_threads_is_refused() -> None:
    with pytest.raises(ValueError, match="most=0"):
        StepThreads(0)
