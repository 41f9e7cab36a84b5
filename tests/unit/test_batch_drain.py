"""The batch job's shared queue over several replicas: a failing grid heals and its work is redone, never lost."""
from __future__ import annotations

import asyncio
from typing import Any

from cluster.generate import Request
from cluster.migration import MAX_GRIDS
from cluster.replica import Replica
from cluster.request import Result
from deployments.batch import drain
from tests.local_grid import DyingGrid, LocalGrid, config, grids
from tests.reference import greedy, hf_greedy


def run(replicas: list[Replica], n: int) -> list[tuple[Result, int]]:
    """Drain `n` greedy 3-token requests over `replicas` (with a hang guard); returns (result, replica) pairs."""
    out: list[tuple[Result, int]] = []

    async def main() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(Request(i, [3 + i, 17, 5], greedy(3)))
        await asyncio.wait_for(drain(queue, replicas, lambda r, g: out.append((r, g))), timeout=120)

    asyncio.run(main())
    return out


def test_a_failing_grid_is_rebuilt_and_every_request_done_once(model_dirs: dict) -> None:
    """Replica 0's grid dies on its 2nd step and is rebuilt; every request ends once, with HF's tokens."""
    d = str(model_dirs["llama_gqa"])
    cfg = config(d, max_num_seqs=2)
    replicas = [Replica(cfg, "grid-0", grid_factory=grids(lambda: DyingGrid(d, 2), lambda: LocalGrid(d, 1, 1))),
                Replica(cfg, "grid-1", grid_factory=lambda: LocalGrid(d, 1, 1))]
    out = run(replicas, 12)
    assert sorted(r.request_id for r, _ in out) == list(range(12))
    assert all(r.error is None and r.token_ids == hf_greedy(d, r.prompt_ids, 3)[0] for r, _ in out)
    assert replicas[0].rebuilds == 1 and {g for _, g in out} == {0, 1}


def test_when_every_rebuild_fails_each_request_fails_once_without_hanging(model_dirs: dict) -> None:
    """Both grids die and cannot be rebuilt: every request still ends, with an error record (none dropped)."""
    d = str(model_dirs["llama_gqa"])

    def gone() -> Any:
        raise TimeoutError("no resources for the new grid")

    cfg = config(d, max_num_seqs=2)
    replicas = [Replica(cfg, f"grid-{i}", grid_factory=grids(lambda: DyingGrid(d, 2), gone)) for i in range(2)]
    out = run(replicas, 10)
    assert sorted(r.request_id for r, _ in out) == list(range(10))
    assert all(r.error for r, _ in out if not r.token_ids) and any(r.error for r, _ in out)
    assert all("grid rebuild failed" in rep.failure() for rep in replicas)


def test_a_request_that_keeps_killing_grids_is_failed_after_max_grids(model_dirs: dict) -> None:
    """Every grid dies on its first step: the request migrates to MAX_GRIDS grids in all, then fails, not looped."""
    d = str(model_dirs["llama_gqa"])
    replica = Replica(config(d), "grid-0", grid_factory=lambda: DyingGrid(d, 1))
    out = run([replica], 1)
    assert len(out) == 1 and out[0][0].error and replica.rebuilds == MAX_GRIDS - 1
