"""CPU weight matmuls on oneDNN's pre-packed (blocked) weight layout, as vLLM's CPU path runs its linears.

PyTorch's `F.linear` hands the plain [out, in] weight to the BLAS, which re-blocks it on every call; with a few to a
few hundred tokens per step that costs more than the math. Packing each large weight once for oneDNN at load time
(PyTorch's own `torch.ops.mkldnn` ops: no extension to build) speeds up multi-sequence steps but slows a single
sequence, where the plain weight streams better. Which of this, the C kernels (`native.gemv`, `native.gemm`) and
PyTorch's GEMM is fastest depends on the CPU (AVX2 or AVX-512), so "auto" times them when a worker loads
(`matmul_plan`) and packs only where oneDNN wins; the fixed modes here are the overrides. Figures: BENCHMARKS.md,
"Kernels".
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from actors.shard import native

PACK_BATCH = 32  # the token count oneDNN tunes the blocked layout for; any count runs on it
PACK_MIN_ELEMENTS = 2**19  # smaller weights (a tiny model's) gained nothing from packing: kept plain
KEEP_PLAIN_MAX_BYTES = 2**30  # "auto": keep plain copies too while they cost at most this per worker
CpuWeights = Literal["auto", "packed", "packed+plain", "plain"]


def available() -> bool:
    """Whether this PyTorch build has oneDNN on this CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packable(weight: torch.Tensor) -> bool:
    """Whether `weight` is a CPU fp32 matrix large enough for packing to pay."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.numel() >= PACK_MIN_ELEMENTS and available())


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] re-laid out once for oneDNN (an opaque mkldnn tensor), or None where that is not possible."""
    try:
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH)  # untyped op
        return packed
    except RuntimeError:  # a build without this op variant: keep the plain path
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ W.T (+ bias) -> [T, out] with W pre-packed by `pack`."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")  # untyped op
    return out


def pack_linears(model: nn.Module, mode: CpuWeights) -> int:
    """Give every module with a `packed` slot and a packable weight its packed copy; free the plain copy unless
    `mode` keeps it (or another module shares it: a tied embedding). Returns how many were packed. "auto" here (a
    model with no fp32 linears for `matmul_plan.plan_linears` to time) packs nothing where the C matmuls are
    built."""
    if mode == "plain" or (mode == "auto" and native.matmuls_available()):
        return 0
    targets = pack_targets(model)
    keep = mode == "packed+plain" or (mode == "auto" and weight_bytes(targets) <= KEEP_PLAIN_MAX_BYTES)
    return pack_into(model, targets, keep)


def pack_targets(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """The modules with a `packed` slot whose weight is worth packing, with that weight."""
    return [(m, w) for m in model.modules() if hasattr(m, "packed") and (w := _parameter(m, "weight")) is not None
            and packable(w)]


def weight_bytes(targets: list[tuple[nn.Module, nn.Parameter]]) -> int:
    """Bytes of the targets' plain weights."""
    return sum(w.numel() * w.element_size() for _, w in targets)


def pack_into(model: nn.Module, targets: list[tuple[nn.Module, nn.Parameter]], keep: bool) -> int:
    """Pack each target's weight into its `packed` slot; free the plain copy unless `keep` or another module
    shares it. Returns how many were packed."""
    users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    count = 0
    with torch.no_grad():
        for module, weight in targets:
            packed = pack(weight)
            setattr(module, "packed", packed)  # noqa: B010 (nn.Module's __setattr__ is typed for tensors/modules only)
            if packed is None:
                continue
            count += 1
            if not keep and users[id(weight)] == 1:  # the packed copy is the only one used from now on
                module.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
    return count


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by packed weights (beside the parameters)."""
    return sum(p.numel() * p.element_size() for m in model.modules() if (p := _tensor(m, "packed")) is not None)


def _parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """`module`'s attribute `name` where it is a Parameter, else None."""
    value = getattr(module, name, None)
    return value if isinstance(value, nn.Parameter) else None


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """`module`'s attribute `name` where it is a tensor, else None."""
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None
