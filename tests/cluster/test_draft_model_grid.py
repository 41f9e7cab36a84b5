"""A draft model beside a real Ray grid at pp=2: the engine's process proposes, two Ray workers verify over the
step channel; greedy output equals Hugging Face's and drafts are kept and rejected."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.speculative import truncated_copy
from cluster.engine import AsyncEngine
from cluster.generate import Request, generate_all
from tests.ray_grid import make_grid
from tests.reference import greedy, hf_greedy

pytestmark = pytest.mark.slow  # a Ray cluster per module
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [3, 17, 5, 42, 8, 11, 2, 60, 33, 9], [11, 12, 11, 12, 11]]


def test_draft_model_beside_a_pipelined_ray_grid(local_ray: None, model_dirs: dict, tmp_path: Path) -> None:
    """Two pipeline stages on Ray workers, the draft in this process: HF's greedy tokens, fewer steps."""
    d = str(model_dirs["llama_gqa"])
    draft = truncated_copy(d, tmp_path / "draft", 3, noise=0.1, seed=3)
    grid = make_grid(d, 1, 2, speculative_config={"model": str(draft), "num_speculative_tokens": 4})
    engine = AsyncEngine.from_config(grid, grid.cfg)

    async def main() -> list[list[int]]:
        try:
            done = await generate_all(engine, [Request(i, p, greedy(20)) for i, p in enumerate(PROMPTS)])
            return [r.token_ids for r in done]
        finally:
            grid.close_dag()

    try:
        assert asyncio.run(main()) == [hf_greedy(Path(d), p, 20)[0] for p in PROMPTS]
    finally:
        grid.shutdown()
    sched = engine.scheduler
    assert 0 < sched.accepted_tokens < sched.draft_tokens and engine.stats.steps < 2 * 20
