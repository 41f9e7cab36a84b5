"""Paged KV cache of one worker (its layers, its KV heads) and the per-step attention metadata."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from actors.shard import host_memory, native

GATHER_CAP_BYTES = 256 * 2**20  # decode gathers K and V in chunks of sequences no bigger than this (bounded memory)


class PagedKVCache:
    """K and V for this worker's layers in fixed-size blocks; slot = block * block_size + offset.

    Head-major ([layer, K|V, kv_head, slot, d]) so that one block of one head is a contiguous run of
    block_size * d values: decode gathers whole blocks, of K and V and every head, with one row copy.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = zeroed((num_layers, 2, kv_heads, num_blocks * block_size, head_dim), dtype, device)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]  # [layer, kv_head, slot, d] views
        self._scratch = torch.empty(0, dtype=dtype, device=device)  # decode gather buffer, reused every layer
        self._rows_of: torch.Tensor | None = None  # the block list `_rows` was built for (same every layer)
        self._rows = torch.empty(0, dtype=torch.long, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Memory one block costs on one worker (K and V, all its layers)."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * kv_heads * head_dim * item

    def block_spans(self, first: int, last: int) -> list[tuple[int, int]]:
        """(address, bytes) of blocks [first, last) in every (layer, K|V, kv_head) run of slots, one span per run."""
        row = self.kv.shape[-1] * self.kv.element_size()  # bytes of one slot
        run = self.num_blocks * self.block_size * row
        start, size = first * self.block_size * row, (last - first) * self.block_size * row
        runs = self.kv.numel() * self.kv.element_size() // run
        return [(self.kv.data_ptr() + r * run + start, size) for r in range(runs)]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new keys/values [T, kv_heads, d] in place at `slots` [T]."""
        self.k[layer].index_copy_(1, slots, k.transpose(0, 1))
        self.v[layer].index_copy_(1, slots, v.transpose(0, 1))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` [ctx] -> two [kv_heads, ctx, d] tensors."""
        return self.k[layer].index_select(1, slots), self.v[layer].index_select(1, slots)

    def gather_blocks(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `blocks` [n] -> two [kv_heads, n * block_size, d] views of a buffer reused by the next call."""
        kv_heads, d = self.k.shape[1], self.k.shape[3]
        row = self.block_size * d
        if self._rows_of is not blocks:  # once per step: every layer gathers the same blocks
            # Row of block b of (K or V, head h) in the layer viewed as [2 * kv_heads * num_blocks, row].
            first = torch.arange(2 * kv_heads, device=blocks.device)[:, None] * self.num_blocks
            self._rows, self._rows_of = (first + blocks[None, :]).flatten(), blocks
        need = self._rows.numel() * row
        if self._scratch.numel() < need:  # grows to the largest decode batch seen, then stays
            self._scratch = torch.empty(need, dtype=self.kv.dtype, device=self.kv.device)
        out = self._scratch[:need].view(-1, row)
        torch.index_select(self.kv[layer].view(-1, row), 0, self._rows, out=out)
        out = out.view(2, kv_heads, -1, d)  # [K|V, kv_heads, n * block_size, d]
        return out[0], out[1]


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on CPU from calloc, whose fresh pages the kernel zeroes only when first touched.

    torch.zeros writes every byte up front; this way the worker chooses what comes in at start (`prefault`: what a
    full batch holds) and the rest comes in as tokens fill it.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    item = torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(np.zeros(math.prod(shape) * item, dtype=np.uint8))  # numpy zeros = calloc
    return raw.view(dtype).view(shape)


def prefault(cache: PagedKVCache, num_blocks: int, threads: int) -> bool:
    """Fault in the pages of blocks [0, num_blocks) on `threads` threads; False where the kernel cannot.

    A block's first write otherwise faults a page per (layer, K|V, head) run inside a step: ~10 us a page where the
    host backs a VM's memory lazily, +9-10% on a 2048-token prefill step of SmolLM2 in the Ray worker (23k pages).
    Contents stay as they are.
    """
    with ThreadPoolExecutor(max(1, threads)) as pool:  # madvise through ctypes lets go of the GIL
        return all(pool.map(lambda span: host_memory.populate(*span), cache.block_spans(0, num_blocks)))


@dataclass
class AttnMeta:
    """Where each sequence's new tokens sit and which cache slots it attends to, built once per step."""

    query_lens: list[int]
    context_lens: list[int]
    write_slots: torch.Tensor  # [T] cache slot of every new token
    read_slots: list[torch.Tensor]  # per sequence after the first num_decode: [ctx] slots of its whole context
    masks: list[torch.Tensor | None]  # per sequence after the first num_decode: [q, ctx] bool (True = attend) or None
    decode_blocks: torch.Tensor | None  # [D * max_blocks] block ids, padded, of the num_decode leading sequences
    decode_bias: torch.Tensor | None  # [1, D, 1, max_blocks * block_size]: 0 where visible, -inf elsewhere
    num_decode: int = 0  # leading sequences with one new token each, attended in one vectorised pass
    decode_lens: torch.Tensor | None = None  # [D] int64 context lengths of those sequences (the C kernel's input)
    window: int | None = None  # sliding window (keys at most window - 1 back are visible), None = full context

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, window: int | None, device: torch.device) -> AttnMeta:
        """Turn block tables into slot indices and causal (optionally sliding-window) masks.

        The scheduler puts decodes first in a mixed step: those leading one-token sequences take the vectorised
        decode path, each prompt chunk after them its own masked attention.
        """
        nd = next((i for i, q in enumerate(query_lens) if q != 1), len(query_lens))
        if nd == len(query_lens):
            return cls._decode(context_lens, block_tables, block_size, window, device)
        head = cls._decode(context_lens[:nd], block_tables[:nd], block_size, window, device) if nd else None
        read, masks, write = [], [], [head.write_slots] if head else []
        for q, ctx, table in zip(query_lens[nd:], context_lens[nd:], block_tables[nd:]):
            blocks = torch.tensor(table, dtype=torch.long)
            slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]
            read.append(slots.to(device))
            write.append(slots[ctx - q:].to(device))
            masks.append(causal_mask(q, ctx, window, device))
        return cls(query_lens, context_lens, torch.cat(write), read, masks, head.decode_blocks if head else None,
                   head.decode_bias if head else None, nd, head.decode_lens if head else None, window)

    @classmethod
    def _decode(cls, context_lens: list[int], block_tables: list[list[int]], block_size: int,
                window: int | None, device: torch.device) -> AttnMeta:
        """Decode-only step, vectorised: one new token per sequence, contexts as padded block rows."""
        ctx = np.asarray(context_lens, dtype=np.int64)
        used = (ctx + block_size - 1) // block_size
        width = int(used.max())
        tables = np.zeros((len(ctx), width), dtype=np.int64)  # padding points at block 0, hidden by the bias
        for i, (table, n) in enumerate(zip(block_tables, used)):
            tables[i, :n] = table[:n]
        last = ctx - 1
        write = tables[np.arange(len(ctx)), last // block_size] * block_size + last % block_size
        keys = np.arange(width * block_size)[None, :]
        visible = keys < ctx[:, None]
        if window is not None:
            visible &= keys > last[:, None] - window
        bias = torch.from_numpy(np.where(visible, 0.0, -np.inf).astype(np.float32))[None, :, None, :]
        return cls([1] * len(ctx), list(context_lens), torch.from_numpy(write).to(device), [], [],
                   torch.from_numpy(tables.reshape(-1)).to(device), bias.to(device), len(ctx),
                   torch.from_numpy(ctx).to(device), window)


def causal_mask(q: int, ctx: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[q, ctx] mask for q new tokens at the end of a ctx-long context; None when nothing is hidden."""
    window_hides = window is not None and ctx > window
    if not window_hides and (q == 1 or q == ctx):
        return None  # plain decode or a fresh prompt: SDPA's own causal flag covers it
    q_pos = torch.arange(ctx - q, ctx, device=device)[:, None]
    k_pos = torch.arange(ctx, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def paged_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttnMeta,
                    scale: float) -> torch.Tensor:
    """Attention of new queries [T, heads, d] over each sequence's cached context -> [T, heads * d]."""
    start = meta.num_decode
    outs = [decode_attention(q[:start], cache, layer, meta, scale)] if start else []
    for n, slots, mask in zip(meta.query_lens[start:], meta.read_slots, meta.masks):
        qi = q[start:start + n].transpose(0, 1)[None]  # [1, heads, n, d]
        k, v = cache.read(layer, slots)  # [kv_heads, ctx, d]
        causal = mask is None and n > 1
        # 4-D on purpose: given 3-D inputs, CPU SDPA takes its math path (2x slower for a 128-token prompt).
        o = F.scaled_dot_product_attention(qi, k[None], v[None], attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=True)  # [1, heads, n, d]
        outs.append(o[0].transpose(0, 1).reshape(n, -1))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttnMeta,
                     scale: float) -> torch.Tensor:
    """One query per leading decode sequence [D, heads, d] over its paged context -> [D, heads * d].

    On CPU (float32) the C kernel reads each key and value once, in place in its block; elsewhere the blocks are
    gathered first (bench.kernels, "decode attention", compares the two).
    """
    assert meta.decode_blocks is not None and meta.decode_lens is not None
    if q.device.type == "cpu" and cache.kv.dtype == torch.float32 and native.available():
        b = q.shape[0]
        return native.paged_decode(q, cache.k[layer], cache.v[layer], meta.decode_blocks.view(b, -1),
                                   meta.decode_lens, cache.block_size, meta.window, scale)
    return gathered_decode(q, cache, layer, meta, scale)


def gathered_decode(q: torch.Tensor, cache: PagedKVCache, layer: int, meta: AttnMeta,
                    scale: float) -> torch.Tensor:
    """Decode attention over block-gathered contexts, as two batched matmuls -> [D, heads * d].

    Sequences go in chunks whose gathered K and V stay under GATHER_CAP_BYTES, so a large batch of long contexts
    cannot exhaust device memory on top of the KV cache.
    """
    assert meta.decode_blocks is not None and meta.decode_bias is not None
    b = q.shape[0]
    width = meta.decode_blocks.numel() // b  # blocks per sequence (padded)
    _, kv_heads, _, d = cache.k.shape
    per_seq = 2 * kv_heads * width * cache.block_size * d * cache.k.element_size()
    chunk = max(1, GATHER_CAP_BYTES // per_seq)
    if chunk >= b:
        return decode_chunk(q, cache, layer, meta.decode_blocks, meta.decode_bias, scale)
    return torch.cat([decode_chunk(q[i:i + chunk], cache, layer, meta.decode_blocks[i * width:(i + chunk) * width],
                                   meta.decode_bias[:, i:i + chunk], scale) for i in range(0, b, chunk)])


def decode_chunk(q: torch.Tensor, cache: PagedKVCache, layer: int, blocks: torch.Tensor, bias: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Attention for B sequences whose padded block rows are `blocks` [B * width], as two batched matmuls."""
    b, heads, d = q.shape
    k, v = cache.gather_blocks(layer, blocks)  # [kv_heads, B * width, d]
    kv_heads = k.shape[0]
    k, v = k.view(kv_heads, b, -1, d), v.view(kv_heads, b, -1, d)  # [kv_heads, B, width * block_size, d]
    # Query head i reads KV head i // group (GQA); batching over (kv_head, sequence) keeps K and V unexpanded.
    qh = q.view(b, kv_heads, heads // kv_heads, d).transpose(0, 1)  # [kv_heads, B, group, d]
    scores = torch.matmul(qh, k.transpose(2, 3)).float().mul_(scale).add_(bias)  # [kv_heads, B, group, w]
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [kv_heads, B, group, d]
    return out.transpose(0, 1).reshape(b, heads * d)
