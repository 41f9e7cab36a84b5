"""CPU weight matmuls on oneDNN's pre-packed (blocked) weight layout, which replaces the plain weight in memory.

PyTorch's `F.linear` hands the plain [out, in] weight to the BLAS, which re-blocks it for its kernel on every
call; with many tokens per step (32-stream decode, prefill chunks) that repacking and the BLAS's threading of
small M cost ~2x here. vLLM's CPU path packs every linear weight once for oneDNN at load time; this does the same
with PyTorch's own oneDNN ops (`torch.ops.mkldnn`), so no extension is built.
"""
from __future__ import annotations

import torch
from torch import nn

PACK_BATCH = 32  # the token count oneDNN tunes the blocked layout for; any count runs on it


def available() -> bool:
    """Whether this PyTorch build has oneDNN on this CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] re-laid out once for oneDNN (an opaque mkldnn tensor), or None where that is not possible."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or not available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH)
    except RuntimeError:  # a build without this op variant: keep the plain path
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ W.T (+ bias) -> [T, out] with W pre-packed by `pack`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Give every module with a `packed` slot its packed weight (after loading) and free the plain copy unless
    another module shares it (a tied embedding); returns how many were packed."""
    users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    count = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not hasattr(module, "packed") or not isinstance(weight, nn.Parameter):
                continue
            module.packed = pack(weight)
            if module.packed is None:
                continue
            count += 1
            if users[id(weight)] == 1:  # the packed copy is the only one used from now on
                module.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
    return count


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by packed weights (beside the parameters)."""
    return sum(m.packed.numel() * m.packed.element_size() for m in model.modules()
               if getattr(m, "packed", None) is not None)
