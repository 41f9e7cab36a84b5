"""Request priorities (vLLM's priority policy): lower is admitted first and preempted last; ties in arrival order."""
from __future__ import annotations

import asyncio

from actors.shard.sampler import SamplingParams
from cluster.blocks import BlockManager
from cluster.engine import AsyncEngine
from cluster.scheduler import Scheduler, Sequence
from tests.local_grid import LocalGrid

GREEDY = SamplingParams(temperature=0.0)


class Out:
    """What `Scheduler.update` reads of a StepOutput."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids


def step(sched: Scheduler) -> list[Sequence]:
    """Schedule one step and answer it with token 7 for every sequence that samples."""
    batch = sched.schedule()
    sched.update(batch, Out([7] * len(batch)))
    return batch


def test_admission_follows_priority_then_arrival() -> None:
    """With one seat, queued sequences run in (priority, arrival) order, whatever order they came in."""
    sched = Scheduler(BlockManager(64, 4), 1, 64, 64)
    seqs = [Sequence(i, [1, 2, 3], GREEDY, 1, priority=p) for i, p in enumerate([2, 0, 1, 0])]
    for s in seqs:
        sched.add(s)
    order = [step(sched)[0].seq_id for _ in seqs]
    assert order == [1, 3, 2, 0]


def test_a_high_priority_arrival_takes_a_seat_from_a_low_priority_one() -> None:
    """Seats full of low-priority decodes: the urgent request is in the very next step; the one it displaced
    (the newest of the lowest priority) waits and later resumes."""
    sched = Scheduler(BlockManager(64, 4), 2, 64, 64)
    low = [Sequence(i, [1, 2, 3], GREEDY, 20, priority=5) for i in range(2)]
    for s in low:
        sched.add(s)
    step(sched)
    urgent = Sequence(9, [4, 5, 6], GREEDY, 20, priority=0)
    sched.add(urgent)
    assert urgent in step(sched) and low[1] in sched.waiting and low[0] in sched.running
    assert sched.num_preemptions == 1


def test_kv_pressure_preempts_the_lowest_priority_first() -> None:
    """When blocks run out, the lowest-priority idle sequence gives its blocks back, not the newest one."""
    sched = Scheduler(BlockManager(6, 4), 4, 64, 64)
    important = Sequence(0, [1] * 7, GREEDY, 30, priority=0)
    other = Sequence(1, [2] * 7, GREEDY, 30, priority=3)
    newest = Sequence(2, [3] * 7, GREEDY, 30, priority=1)
    for s in (important, other, newest):
        sched.add(s)
    for _ in range(4):
        step(sched)
    assert other in sched.waiting and important in sched.running and newest in sched.running


def test_a_burst_of_low_priority_work_does_not_delay_an_urgent_request(model_dirs: dict) -> None:
    """Engine over a real (in-process) grid: 8 low-priority requests fill 2 seats; an urgent one submitted
    mid-burst gets its first token within its prefill step plus those already in flight (two with async
    scheduling, where the next step goes out before the current one answers)."""
    d = str(model_dirs["llama_gqa"])
    grid = LocalGrid(d, 1, 1)

    async def main() -> tuple[int, int]:
        engine = AsyncEngine(grid, 4, 2, 256, 256)

        async def drain(events: object) -> None:
            async for _ in events:  # type: ignore[attr-defined]
                pass

        burst = [asyncio.ensure_future(drain(engine.generate([5, 6, 7, 8], GREEDY, 24, priority=5)))
                 for _ in range(8)]
        while engine.stats.steps < 3:
            await asyncio.sleep(0.001)
        submitted = engine.stats.steps
        async for _ in engine.generate([9, 10, 11], GREEDY, 2, priority=0):
            first = engine.stats.steps
            break
        await asyncio.gather(*burst)
        return first - submitted, engine.slots

    waited, held = asyncio.run(main())
    assert held == 2 and waited <= held + 1
    grid.shutdown()
