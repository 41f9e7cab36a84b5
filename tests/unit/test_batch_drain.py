"""The batch job's shared queue over several engines: a dying grid hands its work to the live ones, never hangs."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import AsyncIterator

from actors.shard.sampler import SamplingParams
from cluster.engine import TokenEvent
from cluster.generate import Request, Result
from deployments.batch import drain


class FakeEngine:
    """Answers each request with its prompt's first token; dies on its `die_at`-th request."""

    def __init__(self, die_at: int | None = None) -> None:
        self.scheduler = SimpleNamespace(max_num_seqs=2)
        self.dead: str | None = None
        self.die_at, self.calls = die_at, 0

    def generate(self, prompt_ids: list[int], *args: object) -> AsyncIterator[TokenEvent]:
        if self.dead:
            raise RuntimeError("grid failed")
        self.calls += 1
        return self._events(prompt_ids[0], self.calls == self.die_at)

    async def _events(self, token: int, die: bool) -> AsyncIterator[TokenEvent]:
        await asyncio.sleep(0.01)
        if die:
            self.dead = "worker died"
            yield TokenEvent(None, "error", "worker died")
        else:
            yield TokenEvent(token, "length")


def run(engines: list[FakeEngine], n: int) -> list[Result]:
    """Drain `n` requests over `engines` (with a hang guard); returns the results."""
    results: list[Result] = []

    async def main() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(Request(i, [100 + i], SamplingParams(temperature=0.0), 1))
        await asyncio.wait_for(drain(queue, engines, None, lambda r, g: results.append(r)), timeout=10)

    asyncio.run(main())
    return results


def test_requests_of_a_dying_grid_move_to_the_live_one() -> None:
    """Grid 0 dies on its 2nd request: every request still gets its token from grid 1, once."""
    results = run([FakeEngine(die_at=2), FakeEngine()], 20)
    assert sorted(r.request_id for r in results) == list(range(20))
    assert all(r.error is None and r.token_ids == [100 + r.request_id] for r in results)


def test_when_every_grid_dies_each_request_fails_once_without_hanging() -> None:
    """Both grids die: every request ends with an error record (none dropped, none twice)."""
    results = run([FakeEngine(die_at=1), FakeEngine(die_at=3)], 12)
    assert sorted(r.request_id for r in results) == list(range(12))
    assert any(r.error is None for r in results) and any(r.error for r in results)
