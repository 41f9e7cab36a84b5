"""The CPU kernels in csrc/ (decode attention over the paged cache, matmuls, RMSNorm): compiled once per
machine with the system's C compiler into one library, loaded with ctypes. Where no compiler works, `available()`
is False and callers keep the torch path.

Why C and not torch: decode attention over a paged cache in torch must first gather each sequence's blocks into
one buffer, so the context is read, written and read again; the kernel reads each key and value once, straight
from its block. A decode step's linear layers are bound by reading their weights, which PyTorch's GEMMs do at
half to two thirds of the read bandwidth with one to four tokens; `gemv_f32` streams them. With 5 to 256
tokens they are bound by arithmetic, where oneDNN's packed layout reached 50-140 GFLOP/s on two cores at 5-64
tokens and `gemm_f32`'s register-blocked loop 56-157 (bench/kernels.py).
Plain C with no torch headers compiles in a few seconds; `-march=native` is why it is built on the machine that
runs it, and why the CPU's flags are in the key.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("paged_decode.c", "gemv.c", "gemm.c", "pointwise.c")]
HEADERS = [CSRC / "simd.h"]  # included by the sources: part of the build key
# -fopenmp: tasks share the OpenMP runtime torch already loaded (same soname, so the loader reuses it).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
GEMV_THREADED_MIN = 2**17  # matmuls with weights smaller than this (512 KiB of fp32) run on one thread


def kernel_dir() -> Path:
    """$GRIDSERVE_CACHE/kernels, else ~/.cache/gridserve/kernels: the root cluster.cache uses for models too."""
    return Path(os.environ.get("GRIDSERVE_CACHE") or Path.home() / ".cache" / "gridserve") / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), '' where /proc/cpuinfo has none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def build(compiler: str | None = None) -> Path:
    """Compile the kernels into the per-machine cache (reused while sources, compiler and CPU stay the same)."""
    cc = compiler or os.environ.get("CC", "gcc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    sources = [path.read_bytes() for path in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:20]
    target = kernel_dir() / f"kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a private name, then renamed: workers starting together never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True, timeout=300,
                       check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (logged once) where it cannot be built here."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("CPU decode attention and weight matmuls fall back to torch: the C kernels did not build "
                    "(%s). Install gcc, or set CC to a C compiler, for the faster path.", detail.strip()[:500])
        return None
    fn = lib.paged_decode_f32
    fn.argtypes = [_PTR] * 6 + [_I64] * 8 + [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.gemv_f32.argtypes = [_PTR] * 3 + [_I64] * 3 + [ctypes.c_int]
    lib.gemv_f32.restype = None
    lib.gemv_vectorised.restype = ctypes.c_int
    lib.gemm_f32.argtypes = [_PTR] * 4 + [_I64] * 3 + [ctypes.c_int]
    lib.gemm_f32.restype = ctypes.c_int
    lib.rms_norm_f32.argtypes = [_PTR] * 3 + [_I64] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.rms_norm_f32.restype = None
    return lib


def available() -> bool:
    """True when the kernels are built and loaded (compiles them on first call)."""
    return _library() is not None


def _loaded(caller: str) -> ctypes.CDLL:
    """The kernel library for `caller`, which its dispatcher has already checked with available()."""
    lib = _library()
    assert lib is not None, f"{caller} needs the C kernels: check available() first"
    return lib


@lru_cache(maxsize=1)
def matmuls_available() -> bool:
    """True when `gemv` and `gemm` are built with AVX2 + FMA here, so they beat PyTorch's GEMMs (else keep those)."""
    lib = _library()
    return lib is not None and lib.gemv_vectorised() == 1


def _matmul_operands(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Checked contiguous x [T, in] and weight [out, in], an empty float32 out [T, out], and the thread count."""
    assert x.dtype == weight.dtype == torch.float32 and x.dim() == weight.dim() == 2 and x.shape[1] == weight.shape[1]
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    # Small weights (a tiny model's) run on one thread: waking the pool costs more than their work.
    threads = torch.get_num_threads() if weight.numel() >= GEMV_THREADED_MIN else 1
    return x.contiguous(), weight.contiguous(), out, threads


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in].T (+ bias) -> [T, out] for float32 CPU tensors (meant for T of one to four)."""
    lib = _loaded("gemv")
    x, weight, out, threads = _matmul_operands(x, weight)
    lib.gemv_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], weight.shape[0], threads)
    return out if bias is None else out.add_(bias)


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in].T (+ bias) -> [T, out] for float32 CPU tensors (meant for T of 5 to 256)."""
    lib = _loaded("gemm")
    assert bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1])
    x, weight, out, threads = _matmul_operands(x, weight)
    bias = None if bias is None else bias.contiguous()  # held here: the C call reads it
    status = lib.gemm_f32(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                          out.data_ptr(), x.shape[0], x.shape[1], weight.shape[0], threads)
    if status != 0:
        raise MemoryError(f"gemm: no memory to stage {x.shape[0]} tokens of width {x.shape[1]}")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dim of a float32 CPU tensor x [..., n] with weight [n], in one call."""
    lib = _loaded("rms_norm")
    assert x.dtype == weight.dtype == torch.float32 and weight.shape == x.shape[-1:]
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    lib.rms_norm_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // max(n, 1), n, eps,
                     torch.get_num_threads())
    return out


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 block_size: int, window: int | None, scale: float) -> torch.Tensor:
    """One query per sequence q [B, heads, d] over one layer's cache k, v [kv_heads, slots, d] through block
    tables [B, width] and context lengths [B] -> [B, heads * d]. float32 CPU tensors only."""
    lib = _loaded("paged_decode")
    b, heads, d = q.shape
    kv_heads, slots, _ = k.shape
    assert q.dtype == k.dtype == v.dtype == torch.float32 and k.stride() == v.stride() == (slots * d, d, 1)
    assert tables.dtype == lens.dtype == torch.int64 and tables.shape[0] == lens.shape[0] == b
    q, tables, lens = q.contiguous(), tables.contiguous(), lens.contiguous()
    out = torch.empty(b, heads, d, dtype=torch.float32)
    status = lib.paged_decode_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                                  out.data_ptr(), b, heads, kv_heads, d, tables.shape[1], block_size, slots * d,
                                  window or 0, scale, torch.get_num_threads())
    if status == -2:  # the kernel checks the bounds before reading (once per call, no torch ops on this hot path)
        raise ValueError(f"paged_decode: contexts of {lens.tolist()} tokens need 1..{tables.shape[1] * block_size} "
                         f"and block ids below {slots // block_size} in their tables, got {tables.tolist()}")
    if status != 0:
        raise MemoryError(f"paged_decode: no memory for the scores of {b} sequences up to {int(lens.max())} tokens")
    return out.view(b, heads * d)
