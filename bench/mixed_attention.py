"""Attention of one mixed step, both paths in one run: 16 decodes leading (vectorised, `AttnMeta.num_decode`)
vs the same rows with the prompt chunk first (every row through the per-sequence path).

python -m bench.mixed_attention
"""
from __future__ import annotations

import random
import time

import torch

from actors.shard.kv_cache import AttnMeta, PagedKVCache, paged_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16  # SmolLM2-135M's attention shapes


def per_layer_us(cache: PagedKVCache, q_lens: list[int], ctx: list[int], tables: list[list[int]]) -> float:
    """Best of 5 x 100 calls, microseconds per layer."""
    meta = AttnMeta.build(q_lens, ctx, tables, BLOCK, None, torch.device("cpu"))
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM)
    for _ in range(20):
        paged_attention(q, cache, 0, meta, 0.125)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(100):
            paged_attention(q, cache, 0, meta, 0.125)
        best = min(best, (time.perf_counter() - start) / 100)
    return 1e6 * best


def main() -> None:
    """Print both timings for 16 decodes (contexts 130-259) and one 128-token prompt chunk."""
    rng = random.Random(0)
    cache = PagedKVCache(1, 2048, BLOCK, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))
    cache.kv.normal_()
    ctx = [rng.randrange(130, 260) for _ in range(16)] + [128]
    free = list(range(2048))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // BLOCK))] for c in ctx]
    q_lens = [1] * 16 + [128]
    mixed = per_layer_us(cache, q_lens, ctx, tables)
    looped = per_layer_us(cache, q_lens[-1:] + q_lens[:-1], ctx[-1:] + ctx[:-1], tables[-1:] + tables[:-1])
    print(f"decodes vectorised: {mixed:.0f} us/layer; every row per sequence: {looped:.0f} us/layer "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
