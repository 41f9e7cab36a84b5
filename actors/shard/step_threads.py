"""How many torch threads each CPU step runs on, chosen from what the steps before it cost.

A second thread speeds a small step up by far less than 2x (a tiny model's decode step: 1.06-1.35x on 2 cores)
while the serving processes beside the worker (engine, ingress, HTTP proxy) need a core to turn its tokens into
responses; a large step uses every thread well (SmolLM2's decode: 1.6-1.7x). Which side of that line a step falls on
depends on the model, the box and the load, so it is measured, not configured: the steps of one size class are
played on each candidate thread count, and the one whose steps follow each other fastest per token (step start to
the next step's start: the step plus everything the replica does before the next one) wins. One step in
`REVISIT` re-measures a losing count, so a change of load can move the pick back.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

SAMPLES = 5  # cycles kept per (size class, thread count); the median decides
REVISIT = 32  # one step in this many replays the count not picked
# A class is compute-bound, and runs on all threads unmeasured, where its smallest step takes this long on them, or
# each of its tokens this long: ten times what the HTTP side spends per token here (~0.5 ms), so freeing it a core
# cannot pay for a slower step.
WHOLE_BELOW_S = 0.025
TOKEN_BELOW_S = 0.005
MARGIN = 1.05  # fewer threads stay picked unless more threads are this much faster per token


def size_class(tokens: int) -> int:
    """Steps of `tokens` tokens fall in class k where 2**(k-1) <= tokens < 2**k."""
    return max(1, tokens).bit_length()


class StepThreads:
    """Per size class of step, the thread count whose steps cycle fastest (out of 1, 2, 4, ... up to `most`)."""

    def __init__(self, most: int, clock: Callable[[], float] = time.perf_counter) -> None:
        if most < 1:
            raise ValueError(f"StepThreads: most={most} threads; expected at least 1")
        self.counts = sorted({most, *(1 << k for k in range(most.bit_length()) if 1 << k < most)})
        self.clock = clock
        self.cycles: dict[tuple[int, int], deque[float]] = {}  # (class, threads) -> seconds per token
        self.played: dict[int, int] = {}  # class -> steps started
        self.last: tuple[float, int, int, int] | None = None  # (start, class, threads, tokens) of the step before

    def choose(self, tokens: int) -> int:
        """The thread count for a step of `tokens` tokens starting now (the step before it ends its cycle here)."""
        now = self.clock()
        if self.last is not None:
            start, cls, threads, before = self.last
            self.cycles.setdefault((cls, threads), deque(maxlen=SAMPLES)).append((now - start) / before)
        cls = size_class(tokens)
        threads = self._pick(cls)
        self.played[cls] = self.played.get(cls, 0) + 1
        self.last = (now, cls, threads, max(1, tokens))
        return threads

    def _pick(self, cls: int) -> int:
        """The settled count, except one step in REVISIT on a losing count; while measuring, the next to measure."""
        settled = self.settled(cls)
        if settled is None:  # all threads first (how the worker ran before), then the others upwards
            most = self.counts[-1]
            todo = [t for t in [most, *self.counts] if self._kept(cls, t) < 3]
            return todo[0]
        if not self._compute_bound(cls) and len(self.counts) > 1 and self.played.get(cls, 0) % REVISIT == 0:
            others = [t for t in self.counts if t != settled]
            return others[(self.played[cls] // REVISIT) % len(others)]
        return settled

    def settled(self, cls: int) -> int | None:
        """The count steps of class `cls` run on outside revisits; None while it is still being measured."""
        most = self.counts[-1]
        if len(self.counts) == 1:
            return most
        if self._kept(cls, most) < 3:
            return None
        if self._compute_bound(cls):
            return most
        if any(self._kept(cls, t) < 3 for t in self.counts):
            return None
        return self.best(cls)

    def _compute_bound(self, cls: int) -> bool:
        """Whether the class's steps take WHOLE_BELOW_S or its tokens TOKEN_BELOW_S or more on every thread."""
        whole = self._median(cls, self.counts[-1])
        return whole is not None and (whole * (1 << (cls - 1)) >= WHOLE_BELOW_S or whole >= TOKEN_BELOW_S)

    def best(self, cls: int) -> int:
        """The measured count with the fastest cycles per token; more threads must win by MARGIN."""
        measured = [(t, cost) for t in self.counts if (cost := self._median(cls, t)) is not None]
        best, best_cost = measured[0]
        for threads, cost in measured[1:]:  # ascending thread counts
            if cost * MARGIN < best_cost:
                best, best_cost = threads, cost
        return best

    def _kept(self, cls: int, threads: int) -> int:
        """Cycles kept for (class, thread count)."""
        return len(self.cycles.get((cls, threads), ()))

    def _median(self, cls: int, threads: int) -> float | None:
        """Median seconds per token of the kept cycles, None before any."""
        kept = list(self.cycles.get((cls, threads), ()))  # a copy: the probe thread reads while steps record
        return statistics.median(kept) if kept else None

    def picks(self) -> dict[str, int]:
        """Size class ('16-31' tokens) -> the count its steps run on, for the classes measured so far."""
        settled = {cls: self.settled(cls) for cls in sorted(list(self.played))}
        return {f"{1 << (cls - 1)}-{(1 << cls) - 1}": t for cls, t in settled.items() if t is not None}
