"""The CPU kernels in csrc/ (decode attention over the paged cache, matmuls, RMSNorm), called through ctypes.

`pip install` builds them (setup.py, with kernel_build's commands): -march=native ties the binary to the machine
that installs it, which is the one that runs it, and plain C with no torch headers needs only setuptools and a C
compiler in pip's isolated build environment, where torch.utils.cpp_extension would need torch there and compile
the C as C++ against its headers. Where that build is missing or stale (edited sources, another CPU), the same
commands build the kernels at first use into a per-machine cache; without a compiler `available()` is False and
callers keep the torch paths.

Why C and not torch: decode attention over a paged cache in torch must first gather each sequence's blocks into
one buffer, so the context is read, written and read again; the kernel reads each key and value once, straight
from its block. A decode step's linear layers are bound by reading their weights, which PyTorch's GEMMs do at
half to two thirds of the read bandwidth with one to four tokens; `gemv_f32` streams them. With 5 to 256
tokens they are bound by arithmetic, where oneDNN's packed layout reached 50-140 GFLOP/s on two cores at 5-64
tokens and `gemm_f32`'s register-blocked loop 56-157 (bench/kernels.py).
"""
from __future__ import annotations

import ctypes
import logging
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from actors.shard import kernel_build

log = logging.getLogger(__name__)

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
F32, I64 = torch.float32, torch.int64
GEMV_THREADED_MIN = 2**17  # matmuls with weights smaller than this (512 KiB of fp32) run on one thread
OPENMP_NAMES = ("libgomp", "libiomp", "libomp")  # file names of the GNU, Intel and LLVM OpenMP runtimes


def library_path() -> Path:
    """The install-time build when it is current, else the first-use build (compiled now if need be)."""
    installed = kernel_build.installed_library()
    if installed is not None:
        return installed
    if kernel_build.installed_path().exists():
        log.info("The installed CPU kernels were built from other sources or for another CPU: building them here.")
    return kernel_build.cached_library()


def openmp_runtime() -> str | None:
    """The OpenMP runtime mapped into this process (torch's own, first), or None where none is."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    mapped = {fields[5] for fields in (line.split(maxsplit=5) for line in lines) if len(fields) == 6}
    runtimes = [path for path in mapped if Path(path).name.startswith(OPENMP_NAMES)]
    torch_dir = str(Path(torch.__file__).parent)
    return min(runtimes, key=lambda path: (not path.startswith(torch_dir), path), default=None)


def _share_openmp_runtime() -> None:
    """Open torch's OpenMP runtime again with RTLD_GLOBAL, so that the kernels' OpenMP calls bind to it."""
    # Two OpenMP runtimes in one process are two thread pools, each sized to every core and spinning while it waits
    # for work, so torch's ops and the kernels would oversubscribe the cores in turn. The kernels are linked against
    # no runtime (kernel_build.LINK_FLAGS) and take the one torch already mapped, found by its path rather than by
    # a soname guessed at build time; RTLD_NOLOAD never loads a second one.
    path = openmp_runtime()
    if path is not None:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (logged once) where they cannot be built or loaded here."""
    try:
        _share_openmp_runtime()
        lib = ctypes.CDLL(str(library_path()))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("CPU decode attention and weight matmuls fall back to torch: the C kernels did not build or "
                    "load (%s). Install gcc, or set CC to a C compiler, for the faster path.", detail.strip()[:500])
        return None
    lib.paged_decode_f32.argtypes = [_PTR] * 6 + [_I64] * 8 + [ctypes.c_float, ctypes.c_int]
    lib.paged_decode_f32.restype = ctypes.c_int
    lib.gemv_f32.argtypes = [_PTR] * 3 + [_I64] * 3 + [ctypes.c_int]
    lib.gemv_f32.restype = None
    lib.gemv_vectorised.restype = ctypes.c_int
    lib.gemm_f32.argtypes = [_PTR] * 4 + [_I64] * 3 + [ctypes.c_int]
    lib.gemm_f32.restype = ctypes.c_int
    lib.rms_norm_f32.argtypes = [_PTR] * 3 + [_I64] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.rms_norm_f32.restype = None
    return lib


def available() -> bool:
    """True when the kernels are built and loaded (builds them on first call where the install did not)."""
    return _library() is not None


@lru_cache(maxsize=1)
def matmuls_available() -> bool:
    """True when `gemv` and `gemm` are built with AVX2 + FMA here, so they beat PyTorch's GEMMs (else keep those)."""
    lib = _library()
    return lib is not None and lib.gemv_vectorised() == 1


def _loaded(caller: str) -> ctypes.CDLL:
    """The kernel library for `caller`, which its dispatcher has already checked with available()."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"{caller} needs the C kernels, which did not build here: check available() first")
    return lib


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
