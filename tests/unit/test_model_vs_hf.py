"""The sharded model (TP ranks as threads, PP stages in sequence) against transformers, every family and layout."""
from __future__ import annotations

import numpy as np
import pytest

from tests.local_grid import LocalGrid
from tests.reference import PROMPTS, grid_greedy, hf_greedy, prefill_logits

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]
NEW = 14


@pytest.fixture(scope="module")
def references(model_dirs: dict) -> dict:
    """HF greedy tokens and logits for every variant and prompt."""
    return {name: [hf_greedy(d, p, NEW) for p in PROMPTS] for name, d in model_dirs.items()}


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2_bias", "llama_tied_mqa", "mistral_window"])
def test_greedy_tokens_and_logits_match_hf(model_dirs: dict, references: dict, variant: str, tp: int, pp: int) -> None:
    """Batched greedy decoding equals HF generate token for token; fp32 logits within 1e-3."""
    grid = LocalGrid(str(model_dirs[variant]), tp, pp, num_blocks=64, block_size=4)
    for prompt, (_, ref_logits) in zip(PROMPTS, references[variant]):
        diff = np.abs(prefill_logits(grid, prompt) - ref_logits.numpy()).max()
        assert diff < 1e-3, f"{variant} tp={tp} pp={pp}: logits differ by {diff}"
    got = grid_greedy(grid, PROMPTS, NEW, block_size=4)
    assert got == [tokens for tokens, _ in references[variant]]


@pytest.mark.parametrize("partition", [(3, 1), (1, 3), (1, 2, 1)])
def test_uneven_layer_partitions_match_hf(model_dirs: dict, references: dict, partition: tuple[int, ...]) -> None:
    """Stages owning unequal runs of layers (what 'balanced' or a user's list gives) still decode HF's tokens."""
    grid = LocalGrid(str(model_dirs["llama_gqa"]), 2, len(partition), num_blocks=64, block_size=4,
                     partition=partition)
    assert [len(s[0].model.model.layer_ids) for s in grid.stages] == list(partition)
    assert grid_greedy(grid, PROMPTS, NEW, block_size=4) == [tokens for tokens, _ in references["llama_gqa"]]


def test_bfloat16_runs_close_to_fp32(model_dirs: dict) -> None:
    """bfloat16 compute gives logits near the fp32 ones (same argmax on a clear winner is not guaranteed)."""
    d = str(model_dirs["llama_gqa"])
    fp32 = prefill_logits(LocalGrid(d, 2, 1), PROMPTS[0])
    bf16 = prefill_logits(LocalGrid(d, 2, 1, dtype="bfloat16"), PROMPTS[0])
    assert np.abs(fp32 - bf16).max() < 0.1
    assert np.corrcoef(fp32, bf16)[0, 1] > 0.99


def test_preemption_under_tiny_cache_keeps_tokens(model_dirs: dict, references: dict) -> None:
    """With too few KV blocks for all sequences, preempted ones are recomputed and still match HF."""
    import asyncio

    from cluster.engine import AsyncEngine
    from cluster.generate import Request, generate_all
    from tests.reference import greedy

    grid = LocalGrid(str(model_dirs["llama_gqa"]), 1, 1, num_blocks=9, block_size=4)

    async def run() -> tuple[list, AsyncEngine]:
        engine = AsyncEngine(grid, 4, 8, 256, 256)
        reqs = [Request(i, p, greedy(NEW, ignore_eos=False)) for i, p in enumerate(PROMPTS)]
        return await generate_all(engine, reqs), engine

    results, engine = asyncio.run(run())
    assert engine.scheduler.num_preemptions > 0
    assert [r.token_ids for r in results] == [t for t, _ in references["llama_gqa"]]
    blocks = engine.scheduler.blocks
    assert blocks.num_available == 9 and not any(blocks.refs)  # every block came back


def test_all_reduces_per_layer_is_two(model_dirs: dict) -> None:
    """One decode step of a stage issues 2 all-reduces per layer (+1 embedding, +1 logits gather)."""
    grid = LocalGrid(str(model_dirs["llama_gqa"]), 2, 1)
    prefill_logits(grid, PROMPTS[1])
    before = grid.stages[0][0].tp.num_collectives
    prefill_logits(grid, PROMPTS[1])
    assert grid.stages[0][0].tp.num_collectives - before == 2 * 4 + 2
