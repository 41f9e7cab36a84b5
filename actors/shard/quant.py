"""Linear weights kept in their GGUF blocks beside the float32 copy, and the C matmul that decodes them in registers.

A decode step reads every weight once; a Q4_1 block holds 32 weights in 20 bytes (Q8_0: 34) where float32 takes
128, so few-token steps on a quantized checkpoint read 4-6x fewer bytes. The blocks decode to exactly the float32
copy's values (same roundings as gguf's decoder), so only the order of the sums differs from the other paths.
The loaders record each part's raw rows as they read it (`keep`); `finalize` joins them per linear where every
part came whole in one supported type; matmul_plan times the path against the float32 ones per token count.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from actors.shard import native

QTYPES = {"Q4_1": 0, "Q8_0": 1}  # GGUF types csrc/quant_gemm.c decodes, with its qtype codes
BLOCK = 32  # weights per block of both types
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}
PARTS = "quant_parts"  # attribute of a linear holding the raw parts recorded while loading


@dataclass(frozen=True)
class QuantWeight:
    """A linear's local weight [out, in] as GGUF blocks: `data` uint8 [out, in / 32 * block bytes]."""

    qtype: str
    data: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        """Rows of the weight."""
        return int(self.data.shape[0])


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The kernel library with quant_gemm_f32 declared, or None where the kernels are not built."""
    lib = native._library()
    if lib is None:
        return None
    lib.quant_gemm_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_int]
    lib.quant_gemm_f32.restype = ctypes.c_int
    lib.quant_gemm_vectorised.restype = ctypes.c_int
    return lib


def available() -> bool:
    """True when the block matmul is built with SIMD here (else the float32 copy serves every step)."""
    lib = _library()
    return lib is not None and lib.quant_gemm_vectorised() == 1


def matmul(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] float32 @ weight.T (+ bias) -> [T, out], decoding the blocks on the fly."""
    lib = _library()
    if lib is None:
        raise RuntimeError("quant.matmul needs the C kernels, which did not build here: check available() first")
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"quant.matmul: x is a {tuple(x.shape)} {x.dtype} tensor on {x.device}; expected float32 "
                         f"[T, {weight.in_features}] on cpu")
    x = x.contiguous()
    tokens, out = x.shape[0], weight.out_features
    y = torch.empty(tokens, out, dtype=torch.float32)
    threads = torch.get_num_threads() if out * weight.in_features >= native.GEMV_THREADED_MIN else 1
    status = lib.quant_gemm_f32(x.data_ptr(), weight.data.data_ptr(), y.data_ptr(), tokens, weight.in_features, out,
                                QTYPES[weight.qtype], threads)
    if status != 0:
        raise ValueError(f"quant.matmul: the kernel refused a {weight.qtype} weight of width {weight.in_features}; "
                         f"expected a multiple of {BLOCK}")
    return y if bias is None else y.add_(bias)


def quantize(weight: torch.Tensor, qtype: str) -> QuantWeight:
    """A float32 [out, in] weight in `qtype` blocks (gguf's own quantizer): calibration and tests."""
    import gguf.quants
    from gguf import GGMLQuantizationType

    raw = gguf.quants.quantize(weight.float().numpy(), GGMLQuantizationType[qtype])
    return QuantWeight(qtype, torch.from_numpy(np.ascontiguousarray(raw)), int(weight.shape[1]))


def dequantize(weight: QuantWeight) -> torch.Tensor:
    """The float32 [out, in] weight its blocks hold (gguf's own decoder)."""
    import gguf.quants
    from gguf import GGMLQuantizationType

    flat = gguf.quants.dequantize(weight.data.numpy().reshape(-1), GGMLQuantizationType[weight.qtype])
    return torch.from_numpy(np.array(flat, dtype=np.float32).reshape(weight.out_features, weight.in_features))


def keep(module: nn.Module, part: int, src: object, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    """Record the raw blocks of checkpoint rows/cols that `module`'s merged part `part` was just loaded from, where
    `src` is a GGUF tensor of a supported type and the columns are whole blocks (else nothing is kept)."""
    read = getattr(src, "raw_blocks", None)
    raw = read(rows, cols) if read is not None else None
    if raw is None or raw[0] not in QTYPES:
        return
    parts = getattr(module, PARTS, None)
    if parts is None:
        parts = {}
        setattr(module, PARTS, parts)
    parts[part] = raw


def finalize(model: nn.Module, use: bool = True) -> int:
    """Give every linear whose parts were all kept in one type its `quant` weight (rows past the checkpoint's,
    a padded vocabulary's, as zero blocks); drop the recorded parts (only that, with `use` False: a CUDA worker).
    Returns how many linears got one."""
    count = 0
    for module in model.modules():
        parts: dict[int, tuple[str, np.ndarray]] | None = module.__dict__.pop(PARTS, None)
        weight = getattr(module, "weight", None)
        if not use or not parts or not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
                or not hasattr(module, "quant"):
            continue
        types = {qtype for qtype, _ in parts.values()}
        expected = len(getattr(module, "out_sizes", [0]))
        if len(types) != 1 or sorted(parts) != list(range(expected)):
            continue  # a part from another type or a non-GGUF source: the float32 copy serves alone
        qtype = types.pop()
        rows, width = weight.shape
        data = np.concatenate([parts[i][1] for i in range(expected)])
        if data.shape[1] != width // BLOCK * BLOCK_BYTES[qtype] or data.shape[0] > rows:
            continue
        if data.shape[0] < rows:
            data = np.concatenate([data, np.zeros((rows - data.shape[0], data.shape[1]), np.uint8)])
        blocks = QuantWeight(qtype, torch.from_numpy(np.ascontiguousarray(data)), int(width))
        setattr(module, "quant", blocks)  # noqa: B010 (nn.Module's __setattr__ is typed for tensors/modules)
        count += 1
    return count


def quant_bytes(model: nn.Module) -> int:
    """Bytes of the block copies the model's linears hold."""
    kept = (getattr(m, "quant", None) for m in model.modules())
    return sum(int(q.data.numel()) for q in kept if isinstance(q, QuantWeight))
