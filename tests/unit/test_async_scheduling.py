"""Async scheduling: with one stage the next step goes out before the current one answers, its decodes reading
the tokens the workers just sampled. Nothing a client sees may change: tokens, seeds, logprobs, stops, blocks."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from actors.shard.runner import StepInput, StepOutput
from cluster.engine import AsyncEngine
from cluster.generate import Request, generate_all
from cluster.request import GenerationParams
from tests.local_grid import LocalGrid


class Watched:
    """A LocalGrid that records how many steps it held at once and how many rows followed a previous step;
    `bunched`: answers are held back until every step it holds has run, so they land together (as on a busy
    event loop that finds both answers waiting)."""

    def __init__(self, grid: LocalGrid, bunched: bool = False) -> None:
        self.grid, self.tp, self.pp, self.num_blocks = grid, grid.tp, grid.pp, grid.num_blocks
        self.bunched = bunched
        self.held = self.most_held = self.followed = self.running = 0
        self.answers: list[tuple[asyncio.Future[StepOutput], StepOutput]] = []

    async def step_async(self, step: StepInput) -> StepOutput:
        """Run the step on the wrapped grid, counting."""
        self.held += 1
        self.running += 1
        self.most_held = max(self.most_held, self.held)
        self.followed += sum(r >= 0 for r in step.follow or [])
        try:
            out = await self.grid.step_async(step)
            self.running -= 1
            if not self.bunched:
                return out
            answer: asyncio.Future[StepOutput] = asyncio.get_running_loop().create_future()
            self.answers.append((answer, out))
            if self.running == 0:  # the last one held: all answers land at once, in order
                for fut, ready in self.answers:
                    fut.set_result(ready)
                self.answers = []
            return await answer
        finally:
            self.held -= 1


def requests(stop_token: int | None = None) -> list[Request]:
    """Greedy, seeded-sampled and logprob requests of several lengths; some stop on `stop_token`."""
    out = []
    for i in range(10):
        prompt = [(11 * i + 3 * k) % 90 + 5 for k in range(3 + 5 * i)]
        stops = [stop_token] if stop_token is not None and i % 3 == 0 else []
        params = GenerationParams(max_tokens=4 + 3 * i, temperature=0.0 if i % 2 else 1.0, seed=100 + i,
                                  logprobs=2 if i % 4 == 1 else None, stop_token_ids=stops, ignore_eos=True)
        out.append(Request(i, prompt, params))
    return out


def run(model_dir: Path, async_scheduling: bool, reqs: list[Request], tp: int = 1, bunched: bool = False
        ) -> tuple[list[Any], Watched, AsyncEngine]:
    """Every request at once through one engine; the results, the watched grid and the engine."""
    grid = Watched(LocalGrid(str(model_dir), tp, 1, num_blocks=96, block_size=4), bunched)

    async def main() -> tuple[list[Any], AsyncEngine]:
        engine = AsyncEngine(grid, 4, 8, 64, 256, async_scheduling=async_scheduling)  # type: ignore[arg-type]
        return await generate_all(engine, reqs), engine

    results, engine = asyncio.run(main())
    return results, grid, engine


@pytest.mark.parametrize(("tp", "bunched"), [(1, False), (1, True), (2, False)])
def test_outputs_equal_synchronous_scheduling_with_two_steps_held(model_dirs: dict[str, Path], tp: int,
                                                                   bunched: bool) -> None:
    """Tokens (greedy and seeded sampling), logprobs and finish reasons equal those of one step at a time, while
    the grid held two steps and decodes followed (at tp=2 rank 0 shares what it sampled; bunched: a step and its
    follower answer together); every block is free afterwards."""
    d = model_dirs["llama_gqa"]
    plain, grid, _ = run(d, False, requests(), tp)
    assert grid.most_held == 1 and grid.followed == 0
    stop = plain[4].token_ids[5]  # a token some greedy outputs really produce, so stop_token_ids end them early
    want, _, _ = run(d, False, requests(stop), tp)
    got, grid, engine = run(d, True, requests(stop), tp, bunched)
    assert grid.most_held == 2 and grid.followed > 20
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert any(r.finish_reason == "stop" for r in got)  # a stop landed while a following step was out
    blocks = engine.scheduler.blocks
    assert blocks.num_available == blocks.num_blocks and not engine.scheduler.running


def test_a_stream_left_early_frees_its_blocks(model_dirs: dict[str, Path]) -> None:
    """A consumer that leaves mid-stream while two steps hold its sequence: its blocks come back once both land."""
    grid = Watched(LocalGrid(str(model_dirs["llama_gqa"]), 1, 1, num_blocks=96, block_size=4))

    async def main() -> AsyncEngine:
        engine = AsyncEngine(grid, 4, 8, 64, 256)  # type: ignore[arg-type]
        sampling = GenerationParams(temperature=0.0).sampling()
        events = engine.generate(list(range(5, 30)), sampling, 40)
        async for _ in events:
            if grid.followed >= 3:
                break
        await events.aclose()
        rest = GenerationParams(max_tokens=6, temperature=0.0)
        await generate_all(engine, [Request(1, [7, 8, 9], rest)])  # steps on; the left sequence's steps land
        return engine

    engine = asyncio.run(main())
    assert grid.followed >= 3
    assert engine.scheduler.blocks.num_available == engine.scheduler.blocks.num_blocks


def test_a_pipeline_does_not_look_ahead(model_dirs: dict[str, Path]) -> None:
    """With pp=2 the first stage never sees what the last one sampled: no step follows another."""
    grid = Watched(LocalGrid(str(model_dirs["llama_gqa"]), 1, 2, num_blocks=96, block_size=4))

    async def main() -> AsyncEngine:
        engine = AsyncEngine(grid, 4, 8, 64, 256)  # type: ignore[arg-type]
        await generate_all(engine, requests()[:4])
        return engine

    engine = asyncio.run(main())
    assert not engine.scheduler.lookahead and grid.followed == 0
