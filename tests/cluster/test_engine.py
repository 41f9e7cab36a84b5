"""The async engine over real Ray grids: continuous batching, pipelined micro-batches, abort, seeded sampling."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from actors.shard.runner import StepInput
from actors.shard.sampler import SamplingParams
from cluster.engine import AsyncEngine
from cluster.generate import Request, generate_all
from cluster.request import GenerationParams
from tests.ray_grid import make_grid
from tests.reference import greedy, hf_greedy

pytestmark = pytest.mark.slow  # a Ray cluster per module


def mixed_requests(n: int, seed: int = 0) -> list[Request]:
    """n greedy requests with prompts of 2..40 tokens and 1..16 new tokens."""
    rng = random.Random(seed)
    return [Request(i, [rng.randrange(2, 96) for _ in range(rng.randint(2, 40))], greedy(rng.randint(1, 16)))
            for i in range(n)]


def run(engine: AsyncEngine, reqs: list[Request], stagger: float = 0.0) -> list:
    """Submit requests (optionally arriving over time) and wait for all."""
    async def main() -> list:
        async def later(r: Request, delay: float) -> list:
            await asyncio.sleep(delay)
            return await generate_all(engine, [r])
        try:
            return [x[0] for x in await asyncio.gather(*(later(r, stagger * i) for i, r in enumerate(reqs)))]
        finally:
            engine.grid.close_dag()
    return asyncio.run(main())


@pytest.mark.parametrize("tp,pp,compiled,channel,partition", [(1, 1, False, "ray", "even"),
                                                              (2, 2, False, "socket", "even"),
                                                              (2, 2, True, "auto", [3, 1])])
def test_32_concurrent_requests_equal_each_alone(local_ray: None, model_dirs: dict, tp: int, pp: int,
                                                 compiled: bool, channel: str, partition: str | list[int]) -> None:
    """Requests arriving while others run (continuous batching, pp micro-batches in flight over the socket
    channel, uneven stages) get HF's greedy tokens, and the last stage reports every stage's compute time."""
    d = model_dirs["llama_gqa"]
    reqs = mixed_requests(32)
    grid = make_grid(str(d), tp, pp, compiled_graph=compiled, pipeline_layer_partition=partition,
                     step_channel=channel)
    assert grid.use_compiled == compiled and (grid.channel is not None) == (channel == "socket")
    out = grid.execute(StepInput(np.array([5, 6]), np.array([0, 1]), [2], [2], [[0]], [SamplingParams()], [0]))
    assert sorted(k for k in out.timings if k.startswith("stage_")) == [f"stage_{k}_s" for k in range(pp)]
    try:
        engine = AsyncEngine(grid, 4, 8, 256, 256)
        assert engine.max_inflight == pp
        results = run(engine, reqs, stagger=0.01)
        blocks = engine.scheduler.blocks  # every block unreferenced (free, or cached for prefix reuse)
        assert engine.stats.steps > 0 and blocks.num_available == grid.num_blocks and not any(blocks.refs)
    finally:
        grid.shutdown()
    for req, res in zip(reqs, results):
        assert res.token_ids == hf_greedy(d, req.prompt_ids, req.params.max_tokens)[0], f"request {req.request_id}"


def test_abort_frees_blocks_and_others_continue(local_ray: None, model_dirs: dict) -> None:
    """Leaving a stream early aborts it: its blocks return, the other request completes."""
    grid = make_grid(str(model_dirs["llama_gqa"]), 2, 1)

    async def main(engine: AsyncEngine) -> tuple[int, list[int]]:
        long = engine.generate([5, 6, 7, 8], SamplingParams(temperature=0.0), 200)
        other = asyncio.ensure_future(generate_all(engine, [Request(1, [9, 10], greedy(20))]))
        async for _ in long:
            if len(engine.scheduler.running[0].output_ids) >= 3:
                break
        await long.aclose()
        done = await other
        engine.grid.close_dag()
        return engine.scheduler.blocks.num_available, done[0].token_ids

    try:
        engine = AsyncEngine(grid, 4, 8, 256, 256)
        free, tokens = asyncio.run(main(engine))
        assert free == grid.num_blocks and len(tokens) == 20
        assert not engine.scheduler.running and not engine.scheduler.waiting
    finally:
        grid.shutdown()


def test_seeded_sampling_reproducible_across_runs_and_layouts(local_ray: None, model_dirs: dict) -> None:
    """Same seed -> same tokens, run after run and on tp=1,pp=1 vs tp=2,pp=2; another seed differs."""
    d = str(model_dirs["llama_gqa"])
    params = [GenerationParams(temperature=0.9, top_p=0.95, top_k=40, seed=s, max_tokens=24, ignore_eos=True)
              for s in (11, 11, 12)]
    reqs = [Request(i, [3, 17, 5, 42], p) for i, p in enumerate(params)]
    outs = []
    for tp, pp in ((1, 1), (2, 2)):
        grid = make_grid(d, tp, pp)
        try:
            outs.append([r.token_ids for r in run(AsyncEngine(grid, 4, 8, 256, 256), reqs)])
        finally:
            grid.shutdown()
    assert outs[0] == outs[1]
    assert outs[0][0] == outs[0][1] != outs[0][2]


def test_config_seed_drives_unseeded_sampling(local_ray: None, model_dirs: dict) -> None:
    """GridServeConfig.seed seeds the sampler of requests without their own seed: the same config seed gives the
    same tokens on a fresh grid, another seed other tokens."""
    d = str(model_dirs["llama_gqa"])
    reqs = [Request(i, [3, 17, 5, 42], GenerationParams(temperature=1.0, max_tokens=24, ignore_eos=True))
            for i in range(2)]
    outs = []
    for seed in (5, 5, 6):
        grid = make_grid(d, 1, 1, seed=seed)
        try:
            outs.append([r.token_ids for r in run(AsyncEngine(grid, 4, 8, 256, 256), reqs)])
        finally:
            grid.shutdown()
    assert outs[0] == outs[1] != outs[2]
