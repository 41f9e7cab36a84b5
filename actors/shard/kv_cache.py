"""Paged KV cache of one worker (its layers, its KV heads) and the per-step attention metadata."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class PagedKVCache:
    """K and V for this worker's layers in fixed-size blocks; slot = block * block_size + offset."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Memory one block costs on one worker (K and V, all its layers)."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * kv_heads * head_dim * item

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new keys/values [T, kv_heads, d] in place at `slots` [T]."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)


@dataclass
class AttnMeta:
    """Where each sequence's new tokens sit and which cache slots it attends to, built once per step."""

    query_lens: list[int]
    context_lens: list[int]
    write_slots: torch.Tensor  # [T] cache slot of every new token
    read_slots: list[torch.Tensor]  # per sequence: [ctx] slots of its whole context
    masks: list[torch.Tensor | None]  # per sequence: [q, ctx] bool (True = attend) or None
    decode_slots: torch.Tensor | None  # [B, max_ctx] when every sequence decodes one token
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_ctx]

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, window: int | None, device: torch.device) -> "AttnMeta":
        """Turn block tables into slot indices and causal (optionally sliding-window) masks."""
        read, masks, write = [], [], []
        for q, ctx, table in zip(query_lens, context_lens, block_tables):
            blocks = torch.tensor(table, dtype=torch.long)
            slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]
            read.append(slots.to(device))
            write.append(slots[ctx - q:])
            masks.append(causal_mask(q, ctx, window, device))
        decode_slots = decode_mask = None
        if query_lens and all(q == 1 for q in query_lens):
            longest = max(context_lens)
            decode_slots = torch.stack([F.pad(s, (0, longest - len(s))) for s in read])
            keys = torch.arange(longest, device=device)[None, :]
            ctx = torch.tensor(context_lens, device=device)[:, None]
            visible = keys < ctx
            if window is not None:
                visible &= keys > ctx - 1 - window
            decode_mask = visible[:, None, None, :]
        return cls(query_lens, context_lens, torch.cat(write).to(device), read, masks,
                   decode_slots, decode_mask)


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
    k_all, v_all = cache.k[layer], cache.v[layer]
    if meta.decode_slots is not None:
        # One token per sequence: gather every context into a padded batch, one SDPA call.
        k = k_all[meta.decode_slots].transpose(1, 2)  # [B, kv_heads, max_ctx, d]
        v = v_all[meta.decode_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=meta.decode_mask,
                                             scale=scale, enable_gqa=True)  # [B, heads, 1, d]
        return out.reshape(q.shape[0], -1)
    outs, start = [], 0
    for n, slots, mask in zip(meta.query_lens, meta.read_slots, meta.masks):
        qi = q[start:start + n].transpose(0, 1)  # [heads, n, d]
        k = k_all[slots].transpose(0, 1)  # [kv_heads, ctx, d]
        v = v_all[slots].transpose(0, 1)
        causal = mask is None and n > 1
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=True)  # [heads, n, d]
        outs.append(o.transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(outs)
