"""Mixed steps and chunked prefill: decodes ride along with prompt chunks, and no output depends on the budget."""
from __future__ import annotations

import asyncio
from typing import Any

from actors.shard.runner import NO_TOKEN
from actors.shard.sampler import SamplingParams
from cluster.blocks import BlockManager
from cluster.engine import AsyncEngine
from cluster.generate import Request, generate_all
from cluster.request import GenerationParams
from cluster.scheduler import Scheduler, Sequence
from tests.local_grid import LocalGrid
from tests.reference import PROMPTS, hf_greedy

GREEDY = SamplingParams(temperature=0.0)


class Out:
    """What `Scheduler.update` reads of a StepOutput."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids


def test_a_step_decodes_running_sequences_and_chunks_a_long_prompt() -> None:
    """Budget 8: a decoding sequence gets 1 token per step, a 20-token prompt gets the other 7, 7, then 6."""
    sched = Scheduler(BlockManager(32, 4), 4, 8, 64)
    a = Sequence(0, [1, 2, 3], GREEDY, 10)
    sched.add(a)
    sched.update(sched.schedule(), Out([9]))  # a's prompt: one step, one token
    b = Sequence(1, list(range(100, 120)), GREEDY, 10)
    sched.add(b)
    sizes = []
    for step_no in range(3):
        batch = sched.schedule()
        step = sched.build_step(batch)
        assert batch == [a, b] and sum(step.query_lens) <= 8
        sizes.append(step.query_lens)
        last = step_no == 2
        assert step.sample == (None if last else [True, False])
        assert step.positions.tolist()[1:] == list(range(b.num_cached, b.num_cached + b.chunk))
        sched.update(batch, Out([10 + step_no, 50 if last else NO_TOKEN]))
        assert b.output_ids == ([50] if last else [])  # a prompt chunk short of the end samples nothing
    assert sizes == [[1, 7], [1, 7], [1, 6]] and a.output_ids == [9, 10, 11, 12]
    assert b.num_cached == 20 and b.remaining == 1


def test_admission_stops_when_the_budget_is_spent() -> None:
    """Two waiting prompts of 6 under a budget of 8: the first whole, the second's first 2 tokens, nothing more."""
    sched = Scheduler(BlockManager(32, 4), 4, 8, 64)
    seqs = [Sequence(i, [i + 1] * 6, GREEDY, 4) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch == seqs[:2] and [s.chunk for s in batch] == [6, 2] and list(sched.waiting) == [seqs[2]]


def run(model_dir: Any, budget: int, requests: list[Request], tp: int = 1, pp: int = 1) -> list[list[int]]:
    """Token ids of every request, run together through an engine with step budget `budget`."""
    grid = LocalGrid(str(model_dir), tp, pp, num_blocks=64, block_size=4)

    async def main() -> list[list[int]]:
        engine = AsyncEngine(grid, 4, 4, budget, 256)
        return [r.token_ids for r in await generate_all(engine, requests)]

    return asyncio.run(main())


def test_greedy_tokens_match_hf_with_prompts_in_chunks(model_dirs: dict) -> None:
    """Budget 5 (every prompt split, decodes mixed in), tp=2 x pp=2 micro-batches: still HF's greedy tokens."""
    d = model_dirs["llama_gqa"]
    reqs = [Request(i, p, GenerationParams(temperature=0.0, max_tokens=6, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    assert run(d, 5, reqs, tp=2, pp=2) == [hf_greedy(d, p, 6)[0] for p in PROMPTS]


def test_sampling_and_penalties_do_not_depend_on_the_budget(model_dirs: dict) -> None:
    """Seeded sampling and penalties give the same tokens whether prompts go whole or in chunks of a few tokens."""
    d = model_dirs["llama_gqa"]
    params = [GenerationParams(temperature=0.9, seed=7, max_tokens=8, ignore_eos=True),
              GenerationParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5, max_tokens=8,
                               ignore_eos=True),
              GenerationParams(temperature=0.7, top_k=20, seed=3, presence_penalty=1.0, max_tokens=8,
                               ignore_eos=True)]
    reqs = [Request(i, p, g) for i, (p, g) in enumerate(zip(PROMPTS, params))]
    whole, chunked = run(d, 256, reqs), run(d, 4, reqs)
    assert whole == chunked and all(len(t) == 8 for t in whole)


class RecordingGrid:
    """A two-stage grid without a model: records each step's query lengths, answers token 7 where it samples."""

    tp, pp, num_blocks = 1, 2, 256

    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    async def step_async(self, step: Any) -> Any:
        self.steps.append(list(step.query_lens))
        await asyncio.sleep(0.01)
        rows = step.sampled_rows()
        return type("Out", (), {"token_ids": [7 if i in rows else NO_TOKEN for i in range(len(step.query_lens))],
                                "logprobs": None})()


def test_a_burst_of_prompts_is_spread_over_the_pipeline_stages() -> None:
    """pp=2, eight 32-token prompts at once under a 512-token budget: both micro-batches carry half the prompts
    (128 tokens each), instead of the first carrying all 256 while the second stage waits."""
    grid = RecordingGrid()

    async def main() -> None:
        engine = AsyncEngine(grid, 4, 32, 512, 256)
        streams = [engine.generate(list(range(10 * i, 10 * i + 32)), GREEDY, 2) for i in range(8)]
        for stream in streams:
            async for _ in stream:
                pass

    asyncio.run(main())
    assert [sum(q) for q in grid.steps[:2]] == [128, 128], grid.steps[:3]
    assert all(q == [1] * len(q) for q in grid.steps[2:]), "after the prompts every step only decodes"
