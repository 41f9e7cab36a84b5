"""The C decode-attention kernel against the torch gather path (its build: test_native_build.py)."""
from __future__ import annotations

import pytest
import torch

from actors.shard import native
from actors.shard.kv_cache import AttnMeta, PagedKVCache, gathered_decode


@pytest.mark.parametrize("d", [20, 32, 64, 128])  # scalar tail, vector dots, vector sums held in registers
@pytest.mark.parametrize("heads,kv_heads,block,window", [(12, 4, 16, None), (6, 6, 5, None), (8, 2, 16, 37),
                                                          (4, 1, 3, 1)])
def test_kernel_matches_the_gather_path(d: int, heads: int, kv_heads: int, block: int, window: int | None) -> None:
    """Scattered blocks, ragged and long contexts, GQA groups, sliding windows: the same answer as gather+matmul."""
    assert native.available(), "the C decode kernel did not build here (see the warning logged)"
    torch.manual_seed(d + heads + block)
    lens = [1, 2, block, block + 1, 300, 77, 5 * block - 1]
    num_blocks = sum(-(-n // block) for n in lens) + 9
    cache = PagedKVCache(2, num_blocks, block, kv_heads, d, torch.float32, torch.device("cpu"))
    cache.kv.normal_()
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range(-(-n // block))] for n in lens]
    meta = AttnMeta.build([1] * len(lens), lens, tables, block, window, torch.device("cpu"))
    q = torch.randn(len(lens), heads + kv_heads, d)[:, :heads]  # a strided view, as the model passes it
    for layer in (0, 1):
        got = native.paged_decode(q, cache.k[layer], cache.v[layer], meta.decode_blocks.view(len(lens), -1),
                                  meta.decode_lens, block, window, d ** -0.5)
        want = gathered_decode(q, cache, layer, meta, d ** -0.5)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)

