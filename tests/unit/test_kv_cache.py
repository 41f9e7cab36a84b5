"""Paged attention (decode and prefill paths) against dense attention over each sequence's own context."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actors.shard import native
from actors.shard.kv_cache import AttnMeta, PagedKVCache, paged_attention

BLOCK = 4


@pytest.fixture(params=["native", "gather"])
def decode_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the C kernel (where this machine builds it) and on the torch gather path."""
    if request.param == "gather":
        monkeypatch.setattr(native, "available", lambda: False)
    else:
        assert native.available(), "the C decode kernel did not build here (see the warning logged)"
    return request.param


@pytest.fixture
def gather_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode takes the torch gather path (the one non-CPU devices use)."""
    monkeypatch.setattr(native, "available", lambda: False)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Reference: q [n, heads, d] at the end of a context k, v [ctx, kv_heads, d] -> [n, heads * d]."""
    n, ctx = q.shape[0], k.shape[0]
    q_pos = torch.arange(ctx - n, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, enable_gqa=True, scale=0.125)
    return out.transpose(0, 1).reshape(n, -1)


@pytest.mark.parametrize("heads,kv_heads,window", [(6, 2, None), (4, 4, None), (4, 1, 5)])
@pytest.mark.parametrize("q_lens,num_decode", [([1] * 5, 5), ([1, 3, 12, 2, 4], 1), ([1, 1, 12, 1, 4], 2),
                                              ([2, 1, 12, 1, 4], 0)])
def test_paged_attention_matches_dense(heads: int, kv_heads: int, window: int | None, q_lens: list[int],
                                       num_decode: int, decode_path: str) -> None:
    """Scattered blocks, ragged contexts, GQA and sliding windows give dense attention's answer: all decodes,
    decodes leading prompt chunks (vectorised, then masked), and one-token rows after a chunk (masked)."""
    torch.manual_seed(0)
    d, layers, num_blocks = 8, 2, 40
    cache = PagedKVCache(layers, num_blocks, BLOCK, kv_heads, d, torch.float32, torch.device("cpu"))
    ctx_lens = [1, 7, 12, 3, 9]
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range(-(-c // BLOCK) + 1)] for c in ctx_lens]  # one spare block each
    meta = AttnMeta.build(q_lens, ctx_lens, tables, BLOCK, window, torch.device("cpu"))
    assert meta.num_decode == num_decode and (meta.decode_blocks is not None) == (num_decode > 0)
    full_k = [torch.randn(c, kv_heads, d) for c in ctx_lens]
    full_v = [torch.randn(c, kv_heads, d) for c in ctx_lens]
    layer = 1
    for i, c in enumerate(ctx_lens):  # the earlier context, as previous steps would have left it
        slots = torch.tensor([tables[i][p // BLOCK] * BLOCK + p % BLOCK for p in range(c - q_lens[i])],
                             dtype=torch.long)
        if len(slots):
            cache.write(layer, full_k[i][:len(slots)], full_v[i][:len(slots)], slots)
    new_k = torch.cat([k[c - n:] for k, c, n in zip(full_k, ctx_lens, q_lens)])
    new_v = torch.cat([v[c - n:] for v, c, n in zip(full_v, ctx_lens, q_lens)])
    cache.write(layer, new_k, new_v, meta.write_slots)
    q = torch.randn(sum(q_lens), heads, d)
    got = paged_attention(q, cache, layer, meta, scale=0.125)
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    want = torch.cat([dense(q[s:s + n], k, v, window) for s, n, k, v in zip(starts, q_lens, full_k, full_v)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.k[0].abs().sum() == 0  # other layers untouched


def test_decode_gather_buffer_is_reused(gather_path: None) -> None:
    """The decode gather buffer grows once and is then reused, not reallocated every layer."""
    cache = PagedKVCache(1, 8, BLOCK, 2, 4, torch.float32, torch.device("cpu"))
    meta = AttnMeta.build([1, 1], [5, 8], [[0, 1], [2, 3]], BLOCK, None, torch.device("cpu"))
    q = torch.randn(2, 2, 4)
    paged_attention(q, cache, 0, meta, scale=0.5)
    buffer = cache._scratch.data_ptr()
    assert buffer != 0
    paged_attention(q, cache, 0, meta, scale=0.5)
    assert cache._scratch.data_ptr() == buffer


def test_decode_in_chunks_under_a_memory_cap(monkeypatch: pytest.MonkeyPatch, gather_path: None) -> None:
    """With a cap smaller than the batch's gather, decode runs in chunks: same answer, buffer within the cap."""
    from actors.shard import kv_cache

    torch.manual_seed(1)
    cache = PagedKVCache(1, 40, BLOCK, 2, 8, torch.float32, torch.device("cpu"))
    cache.k.normal_(), cache.v.normal_()
    ctx_lens = [5, 9, 13, 2, 16, 7]
    tables = [[5 * i + j for j in range(5)] for i in range(len(ctx_lens))]
    meta = AttnMeta.build([1] * len(ctx_lens), ctx_lens, tables, BLOCK, None, torch.device("cpu"))
    q = torch.randn(len(ctx_lens), 4, 8)
    whole = paged_attention(q, cache, 0, meta, scale=0.125)
    per_seq = 2 * 2 * 4 * BLOCK * 8 * 4  # K and V, 2 heads, 4 padded blocks, fp32
    monkeypatch.setattr(kv_cache, "GATHER_CAP_BYTES", 2 * per_seq)  # two sequences per chunk
    cache._scratch = torch.empty(0)
    torch.testing.assert_close(paged_attention(q, cache, 0, meta, scale=0.125), whole)
    assert cache._scratch.numel() * 4 <= 2 * per_seq
