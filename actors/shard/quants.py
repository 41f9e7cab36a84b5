"""GGUF tensor types decoded to float32 with vectorized numpy: whole rows of blocks in, floats out.

Block layouts follow ggml's: a block of `elems` weights is stored in `nbytes` bytes, with float16 scales
(`d`, and `dmin`/`m` for the types with an offset) next to packed integer codes. K-quants group 256 weights in
a super-block whose sub-block scales are themselves quantized.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

# type -> (weights per block, bytes per block)
BLOCKS: dict[T, tuple[int, int]] = {
    T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2), T.Q8_0: (32, 34), T.Q4_0: (32, 18), T.Q4_1: (32, 20),
    T.Q4_K: (256, 144), T.Q5_K: (256, 176), T.Q6_K: (256, 210),
}


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The float16 stored at byte `at` of every block, as float32 [n, 1]."""
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, k] packed bytes -> [n, 2, k] codes: low nibbles first, then high nibbles."""
    return np.stack([qs & 0x0F, qs >> 4], axis=1)


def _f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f4").copy()


def _f16_elems(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _bf16(b: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32: widen the bits, do not convert values.
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16).view(np.float32)


def _q8_0(b: np.ndarray) -> np.ndarray:
    q = b[:, 2:].view(np.int8).astype(np.float32)
    q *= _f16(b, 0)  # in place: one [n, 32] temporary, not three
    return q


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:]).reshape(len(b), 32).astype(np.float32)  # [n, 32]
    q -= 8.0
    q *= _f16(b, 0)
    return q


def _q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 4:]).reshape(len(b), 32).astype(np.float32)  # [n, 32]
    q *= _f16(b, 0)
    q += _f16(b, 2)
    return q


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of Q4_K/Q5_K -> eight 6-bit scales and eight 6-bit mins, each [n, 8]."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Apply Q4_K/Q5_K super-block scales to codes q [n, 8, 32] (sub-block j = weights 32j..32j+31)."""
    scales, mins = _k_scales(b[:, 4:16])
    out = (_f16(b, 0) * scales)[:, :, None] * q - (_f16(b, 2) * mins)[:, :, None]
    return out.reshape(len(b), 256)


def _q4_k(b: np.ndarray) -> np.ndarray:
    # 4 chunks of 32 bytes; chunk i holds sub-block 2i in its low nibbles and 2i + 1 in its high ones.
    q = _nibbles(b[:, 16:144].reshape(len(b) * 4, 32)).reshape(len(b), 8, 32)
    return _k_affine(b, q.astype(np.float32))


def _q5_k(b: np.ndarray) -> np.ndarray:
    low = _nibbles(b[:, 48:176].reshape(len(b) * 4, 32)).reshape(len(b), 8, 32)
    # Bit j of qh[l] is the fifth bit of weight l of sub-block j.
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    return _k_affine(b, (low | (high << 4)).astype(np.float32))


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    # Each half of 128 weights: 64 low-nibble bytes (two groups of 32) and 32 bytes of 2-bit high parts.
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [n, half, group, l]
    low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # [n, half, nibble * 2 + group, l]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3  # [n, half, 4, l]
    q = ((low | (high << 4)).astype(np.float32) - 32.0).reshape(n, 16, 16)  # 16 groups of 16 weights
    scales = b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16], one per group
    return (_f16(b, 208)[:, :, None] * scales[:, :, None] * q).reshape(n, 256)


DECODERS: dict[T, Callable[[np.ndarray], np.ndarray]] = {
    T.F32: _f32, T.F16: _f16_elems, T.BF16: _bf16, T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1,
    T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}


def supported_names() -> list[str]:
    """Names of the tensor types gridserve can dequantize."""
    return [t.name for t in DECODERS]


def dequantize(raw: np.ndarray, qtype: T) -> np.ndarray:
    """Raw bytes [rows, blocks * nbytes] (uint8) -> float32 [rows, blocks * elems]."""
    elems, nbytes = BLOCKS[qtype]
    rows = raw.shape[0]
    if raw.shape[1] % nbytes:
        raise ValueError(f"{raw.shape[1]} bytes per row is not a whole number of {qtype.name} blocks ({nbytes} B)")
    blocks = np.ascontiguousarray(raw).reshape(-1, nbytes)  # [rows * blocks, nbytes]
    return DECODERS[qtype](blocks).reshape(rows, raw.shape[1] // nbytes * elems)
