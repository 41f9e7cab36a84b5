"""Megatron-style parallel layers; each allocates only its shard and loads it with `weight_loader`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from actors.shard import matmul_plan, native, quant
from actors.shard.cpu_gemm import packed_linear
from actors.shard.matmul_plan import MatmulPlan, split_linear
from actors.shard.quant import QuantWeight
from actors.shard.spec import HeadSplit
from actors.shard.tp import TPGroup

SliceIndex = slice | tuple[slice, ...]  # what loading asks of a checkpoint tensor: x[a:b], x[:, a:b], x[:]


class LazySlice(Protocol):
    """A checkpoint tensor read on demand: safetensors' `get_slice` result or an in-memory stand-in."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: SliceIndex) -> torch.Tensor: ...


class LowRankDelta(Protocol):
    """A layer's LoRA slots (actors.shard.lora): adds the step's adapters' low-rank terms to an output."""

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def check_shape(key: str, src: LazySlice, expected: Sequence[int]) -> None:
    """Fail loudly, naming the key, when a checkpoint tensor's full shape is not what the config implies."""
    got = list(src.get_shape())
    if got != list(expected):
        raise ValueError(f"checkpoint tensor {key!r} has shape {got}, expected {list(expected)} "
                         "from config.json; the checkpoint and its config do not match")


def read_rows(src: LazySlice, start: int, stop: int) -> torch.Tensor:
    """Read rows [start, stop) of dim 0 only: the rest of the tensor is never materialized."""
    return src[start:stop]


def read_cols(src: LazySlice, start: int, stop: int) -> torch.Tensor:
    """Read columns [start, stop) of a 2-D tensor only."""
    return src[:, start:stop]


SPLIT_MAX_TOKENS = 256  # above this, PyTorch's own multi-threaded GEMM is as fast as the split below
GEMV_MAX_TOKENS = 4  # up to this many tokens the C few-token matmul (native.gemv) reads the plain weight fastest
GEMM_MAX_TOKENS = 256  # up to this many the C matmul (native.gemm) beats or ties oneDNN and PyTorch's GEMM


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None, plan: MatmulPlan | None = None,
           quant_weight: QuantWeight | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in].T (+ bias) -> [T, out], on the fastest path for T (python -m bench.kernels).

    With `plan` (timed on this machine when the worker loaded: `matmul_plan`), fp32 CPU steps take the plan's path
    for T (its 'quant' path reads `quant_weight`, the GGUF blocks), falling back to the copy that exists. Without
    one (a fixed `cpu_weights` layout), on CPU in fp32 with the plain weight the C kernels take every step up to
    GEMM_MAX_TOKENS: with one to GEMV_MAX_TOKENS tokens the step is bound by reading the weight and `native.gemv`
    streams it; with more it is bound by arithmetic and `native.gemm`'s register-blocked loop runs it (on an AVX2
    machine). Above that PyTorch's threaded GEMM is as fast. With `packed` (the weight packed by cpu_gemm) oneDNN
    runs what the kernels do not, except prefill-sized steps (over SPLIT_MAX_TOKENS) on 2+ threads, where PyTorch's
    own GEMM is faster. The figures behind each threshold: BENCHMARKS.md, "Kernels" (`python -m bench.kernels`).

    Without the C kernels or a packed copy, few tokens on 2+ threads cut the output rows into one block per thread
    and run them as one batched matmul, which keeps every core reading weights where PyTorch's GEMM streams them
    on one. Each output is still one dot product over `in`.
    """
    splits = torch.get_num_threads()
    rows, tokens = weight.shape[0], x.shape[0]
    if plan is not None and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2:
        path = matmul_plan.resolve(plan.path(tokens), weight, packed, quant_weight)
        return matmul_plan.run(path, x, weight, bias, packed, quant_weight)
    if (tokens <= GEMM_MAX_TOKENS and weight.numel() and x.dim() == 2 and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu" and native.matmuls_available()):
        return native.gemv(x, weight, bias) if tokens <= GEMV_MAX_TOKENS else native.gemm(x, weight, bias)
    plain_wins = tokens == 1 or (tokens > SPLIT_MAX_TOKENS and splits > 1)
    if packed is not None and (weight.numel() == 0 or not plain_wins):
        return packed_linear(x, packed, bias)
    if x.device.type != "cpu" or splits < 2 or tokens > SPLIT_MAX_TOKENS or rows % splits or x.dim() != 2:
        return F.linear(x, weight, bias)
    return split_linear(x, weight, bias)


class ReplicatedParam(nn.Module):
    """Loader for parameters every rank holds whole (norm weights)."""

    @staticmethod
    def weight_loader(param: nn.Parameter, src: LazySlice, key: str) -> None:
        """Copy the full tensor into `param`."""
        check_shape(key, src, param.shape)
        param.data.copy_(src[:])


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dim of `x`."""
        if x.dtype == torch.float32:
            if x.device.type == "cpu" and native.available():  # one C call: torch's is ~6 dispatched ops
                return native.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # same values as the form below
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    weight_loader = staticmethod(ReplicatedParam.weight_loader)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows over ranks; the output stays sharded (no communication)."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], tp: TPGroup, bias: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.out_sizes = list(out_sizes)  # full output size of each merged part (e.g. gate, up)
        for size in self.out_sizes:
            if size % tp.size:
                raise ValueError(f"output size {size} does not divide by tensor_parallel_size={tp.size}")
        local = sum(self.out_sizes) // tp.size
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN layout of `weight`, set after loading (cpu_gemm.pack_linears)
        self.plan: MatmulPlan | None = None  # CPU matmul path per token count, set with `packed`
        self.quant: QuantWeight | None = None  # the weight's GGUF blocks, set after loading (quant.finalize)
        self.lora: LowRankDelta | None = None  # LoRA slots, when the server enables LoRA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] -> [T, local_out]."""
        y = linear(x, self.weight, self.bias, self.packed, self.plan, self.quant)
        return y if self.lora is None else self.lora.add(x, y)

    def part_rows(self, part: int) -> tuple[int, int, int]:
        """(offset in the local weight, start row in the checkpoint tensor, row count) for merged part `part`."""
        local = self.out_sizes[part] // self.tp.size
        offset = sum(s // self.tp.size for s in self.out_sizes[:part])
        return offset, self.tp.rank * local, local

    def weight_loader(self, param: nn.Parameter, src: LazySlice, key: str, part: int = 0) -> None:
        """Load this rank's rows of checkpoint tensor `key` into merged part `part`."""
        offset, start, rows = self.part_rows(part)
        full = [self.out_sizes[part]] + list(param.shape[1:])
        check_shape(key, src, full)
        param.data[offset:offset + rows].copy_(read_rows(src, start, start + rows))
        quant.keep(self, part, src, (start, start + rows), (0, self.in_features))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by KV-head groups; KV heads are replicated when tp > num_kv_heads."""

    PARTS = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden: int, head_dim: int, total_heads: int, total_kv_heads: int,
                 split: HeadSplit, tp: TPGroup, bias: bool, dtype: torch.dtype) -> None:
        self.head_dim = head_dim
        self.split = split
        self.full_sizes = [total_heads * head_dim, total_kv_heads * head_dim, total_kv_heads * head_dim]
        # Local sizes times tp, so the base class allocates exactly this rank's q + k + v rows.
        scaled = [split.num_heads * head_dim * tp.size, split.num_kv_heads * head_dim * tp.size,
                  split.num_kv_heads * head_dim * tp.size]
        super().__init__(hidden, scaled, tp, bias, dtype)

    def part_rows(self, part: int) -> tuple[int, int, int]:
        """Rows of q (by query heads) or of k/v (by this rank's KV-head group) in the checkpoint."""
        d, s = self.head_dim, self.split
        if part == 0:
            return 0, self.tp.rank * s.num_heads * d, s.num_heads * d
        offset = (s.num_heads + (part - 1) * s.num_kv_heads) * d
        return offset, s.kv_head_start * d, s.num_kv_heads * d

    def weight_loader(self, param: nn.Parameter, src: LazySlice, key: str, part: int = 0) -> None:
        """Load this rank's heads of the q, k or v checkpoint tensor."""
        offset, start, rows = self.part_rows(part)
        check_shape(key, src, [self.full_sizes[part]] + list(param.shape[1:]))
        param.data[offset:offset + rows].copy_(read_rows(src, start, start + rows))
        quant.keep(self, part, src, (start, start + rows), (0, self.in_features))


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial sums are all-reduced in `forward`."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} does not divide by tensor_parallel_size={tp.size}")
        self.tp = tp
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp.size, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN layout of `weight`, set after loading (cpu_gemm.pack_linears)
        self.plan: MatmulPlan | None = None  # CPU matmul path per token count, set with `packed`
        self.quant: QuantWeight | None = None  # the weight's GGUF blocks, set after loading (quant.finalize)
        self.lora: LowRankDelta | None = None  # LoRA slots: their partial sums ride the same all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, local_in] -> [T, out], summed over the TP group."""
        partial = linear(x, self.weight, packed=self.packed, plan=self.plan, quant_weight=self.quant)
        y = self.tp.all_reduce(partial if self.lora is None else self.lora.add(x, partial))
        return y if self.bias is None else y + self.bias

    def weight_loader(self, param: nn.Parameter, src: LazySlice, key: str) -> None:
        """Load this rank's input columns (the bias is whole on every rank)."""
        if param.dim() == 1:
            return ReplicatedParam.weight_loader(param, src, key)
        check_shape(key, src, [param.shape[0], self.in_features])
        cols = param.shape[1]
        param.data.copy_(read_cols(src, self.tp.rank * cols, (self.tp.rank + 1) * cols))
        quant.keep(self, 0, src, (0, param.shape[0]), (self.tp.rank * cols, (self.tp.rank + 1) * cols))


class VocabParallelEmbedding(nn.Module):
    """Embedding split by vocabulary rows (padded to a multiple of tp); one all-reduce joins the parts."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.rows = -(-vocab_size // tp.size)  # ceil: the padded vocab splits evenly
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden]."""
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)

    def weight_loader(self, param: nn.Parameter, src: LazySlice, key: str) -> None:
        """Load this rank's vocabulary rows; the padding rows past the real vocab stay zero."""
        check_shape(key, src, [self.vocab_size, self.hidden])
        stop = min(self.start + self.rows, self.vocab_size)
        if stop > self.start:
            param.data[:stop - self.start].copy_(read_rows(src, self.start, stop))


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection split by vocabulary rows; logits are gathered and trimmed to the real vocab."""

    packed: torch.Tensor | None = None  # oneDNN layout of `weight`, set after loading (cpu_gemm.pack_linears)
    plan: MatmulPlan | None = None  # CPU matmul path per token count, set with `packed`
    quant: QuantWeight | None = None  # the weight's GGUF blocks, set after loading (quant.finalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, vocab] float32 logits on every rank."""
        local = linear(x, self.weight, packed=self.packed, plan=self.plan, quant_weight=self.quant)  # [T, rows]
        full = self.tp.all_gather(local.float(), dim=-1)  # [T, rows * tp]
        return full[:, :self.vocab_size]

    def weight_loader(self, param: nn.Parameter, src: LazySlice, key: str) -> None:
        """Load this rank's vocabulary rows (and keep their GGUF blocks)."""
        super().weight_loader(param, src, key)
        stop = min(self.start + self.rows, self.vocab_size)
        if stop > self.start:
            quant.keep(self, 0, src, (self.start, stop), (0, self.hidden))
