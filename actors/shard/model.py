"""One pipeline stage of a Llama-family decoder (Llama, Mistral, Qwen2), sharded over a TP group."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from actors.shard.kv_cache import AttnMeta, PagedKVCache, paged_attention
from actors.shard.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from actors.shard.partition import Partition, resolve_partition, stage_layers
from actors.shard.rope import Rotary, apply_rotary
from actors.shard.spec import HeadSplit, ModelSpec
from actors.shard.tp import TPGroup


class Attention(nn.Module):
    """Self-attention over this rank's heads: column-parallel QKV, paged cache, row-parallel o_proj."""

    def __init__(self, spec: ModelSpec, split: HeadSplit, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.split = split
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, split, tp, spec.qkv_bias, dtype)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, tp,
                                        spec.o_bias, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache,
                layer: int, meta: AttnMeta) -> torch.Tensor:
        """[T, hidden] -> [T, hidden] (after the o_proj all-reduce)."""
        t, d, s = x.shape[0], self.head_dim, self.split
        qk, v = self.qkv_proj(x).split([(s.num_heads + s.num_kv_heads) * d, s.num_kv_heads * d], dim=-1)
        # q and k rotate by the same angles: one rotary over both halves the small ops of a decode step.
        qk = apply_rotary(qk.view(t, s.num_heads + s.num_kv_heads, d), cos, sin)  # [T, heads + kv_heads, d]
        q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
        cache.write(layer, k, v.view(t, s.num_kv_heads, d), meta.write_slots)
        out = paged_attention(q, cache, layer, meta, self.scale)  # [T, heads * d]
        projected: torch.Tensor = self.o_proj(out)  # nn.Module calls are typed as returning Any
        return projected


class MLP(nn.Module):
    """SwiGLU: merged column-parallel gate/up, row-parallel down."""

    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(spec.hidden_size, [size, size], tp, spec.mlp_bias, dtype)
        self.down_proj = RowParallelLinear(size, spec.hidden_size, tp, spec.mlp_bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, hidden] (after the down_proj all-reduce)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, inter / tp] each
        down: torch.Tensor = self.down_proj(F.silu(gate).mul_(up))  # in place: one [T, inter / tp] buffer fewer
        return down


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block: exactly two all-reduces (o_proj, down_proj)."""

    def __init__(self, spec: ModelSpec, split: HeadSplit, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, split, tp, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp = MLP(spec, tp, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache,
                layer: int, meta: AttnMeta) -> torch.Tensor:
        """Residual stream [T, hidden] -> [T, hidden]."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, meta)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class Backbone(nn.Module):
    """`model.*` of the HF checkpoint restricted to one stage: embedding first, final norm last."""

    def __init__(self, spec: ModelSpec, tp: TPGroup, pp_rank: int, partition: Partition, dtype: torch.dtype) -> None:
        super().__init__()
        split = HeadSplit.of(spec, tp.rank, tp.size)
        self.layer_ids = stage_layers(partition, pp_rank)
        self.is_first, self.is_last = pp_rank == 0, pp_rank == len(partition) - 1
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp, dtype) \
            if self.is_first else None
        # Keyed by the global layer index so parameter names match the checkpoint's.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(spec, split, tp, dtype) for i in self.layer_ids})
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype) if self.is_last else None


class StageModel(nn.Module):
    """The part of a causal LM one (pp_rank, tp_rank) worker runs."""

    def __init__(self, spec: ModelSpec, tp: TPGroup, pp_rank: int, partition: Partition, dtype: torch.dtype,
                 max_len: int, device: torch.device) -> None:
        super().__init__()
        spec.check_tp(tp.size)
        resolve_partition(spec, len(partition), partition)  # the counts must fit this model
        self.spec = spec
        self.model = Backbone(spec, tp, pp_rank, partition, dtype)
        self.lm_head = None
        if self.model.is_last:
            self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, tp, dtype)
            if spec.tie_word_embeddings and self.model.embed_tokens is not None:
                self.lm_head.weight = self.model.embed_tokens.weight  # same vocab split, share memory
        self.rotary = Rotary(spec.head_dim, spec.rope_theta, spec.rope_scaling, max_len, dtype, device)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
                meta: AttnMeta) -> torch.Tensor:
        """Token ids [T] (first stage) or hidden states [T, hidden] -> hidden states [T, hidden]."""
        x = self.model.embed_tokens(inputs) if self.model.embed_tokens is not None else inputs
        cos, sin = self.rotary.tables(positions)
        for local, module in enumerate(self.model.layers.values()):
            x = module(x, cos, sin, cache, local, meta)
        return self.model.norm(x) if self.model.norm is not None else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, hidden] -> float32 logits [B, vocab] (last stage only)."""
        assert self.lm_head is not None, "logits() is only available on the last pipeline stage"
        logits: torch.Tensor = self.lm_head(hidden)
        return logits
