"""The CPU kernels in csrc/ (decode attention over the paged cache, matmuls, RMSNorm), called through ctypes behind
wrappers that check every argument first: a wrong dtype, device, shape or index is a ValueError, never a bad read.

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
    torch_dir = str(Path(torch.__file__).resolve().parent)  # maps name files by their real paths
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


def _tensor(caller: str, name: str, t: torch.Tensor, dtype: torch.dtype, dims: int) -> None:
    """Raise a ValueError naming `name` unless `t` is a CPU tensor of `dtype` with `dims` dimensions (0: any)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{caller}: {name} is a {type(t).__name__}; expected a {dtype} CPU tensor")
    if t.dtype != dtype or not t.is_cpu or (dims and t.dim() != dims):
        want = f"{dims}-D " if dims else ""
        raise ValueError(f"{caller}: {name} is a {t.dim()}-D {t.dtype} tensor on {t.device}; expected a {want}"
                         f"{dtype} tensor on cpu")


def _contiguous(caller: str, name: str, t: torch.Tensor) -> None:
    """Raise a ValueError naming `name` unless `t` is contiguous (weights are read in place, never copied per call)."""
    if not t.is_contiguous():
        raise ValueError(f"{caller}: {name} of shape {tuple(t.shape)} has strides {t.stride()}; expected a "
                         f"contiguous tensor (make it contiguous once where it is created)")


def _bad_shapes(caller: str, shapes: str, expected: str) -> ValueError:
    """The error for arguments whose shapes do not agree."""
    return ValueError(f"{caller}: {shapes}; expected {expected}")


def _threads(caller: str) -> int:
    """torch's thread count, checked: the kernels share their work over that many OpenMP threads."""
    threads = torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"{caller}: the thread count is {threads}; expected at least 1 (torch.set_num_threads)")
    return threads


def _matmul_operands(caller: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], int]:
    """Checked x [T, in] (made contiguous), weight [out, in] and bias [out]; an empty out [T, out]; (T, in, out) as
    the kernels take them; the thread count."""
    _tensor(caller, "x", x, F32, 2)
    _tensor(caller, "weight", weight, F32, 2)
    tokens, cols = x.shape
    rows, width = weight.shape
    if cols != width or cols == 0:
        raise _bad_shapes(caller, f"x is {tuple(x.shape)} and weight {tuple(weight.shape)}",
                          "x [T, in] and weight [out, in] with the same in, at least 1")
    _contiguous(caller, "weight", weight)
    if bias is not None:
        _tensor(caller, "bias", bias, F32, 1)
        if bias.shape[0] != rows:
            raise _bad_shapes(caller, f"bias is {tuple(bias.shape)} for weight {tuple(weight.shape)}",
                              f"bias of shape ({rows},)")
        _contiguous(caller, "bias", bias)
    # Small weights (a tiny model's) run on one thread: waking the pool costs more than their work.
    threads = _threads(caller) if rows * cols >= GEMV_THREADED_MIN else 1
    return x.contiguous(), torch.empty(tokens, rows, dtype=F32), (tokens, cols, rows), threads


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in].T (+ bias) -> [T, out] for float32 CPU tensors (meant for T of one to four)."""
    lib = _loaded("gemv")
    x, out, shape, threads = _matmul_operands("gemv", x, weight, bias)
    lib.gemv_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), *shape, threads)
    return out if bias is None else out.add_(bias)


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in].T (+ bias) -> [T, out] for float32 CPU tensors (meant for T of 5 to 256)."""
    lib = _loaded("gemm")
    x, out, shape, threads = _matmul_operands("gemm", x, weight, bias)
    status = lib.gemm_f32(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                          out.data_ptr(), *shape, threads)
    if status != 0:
        raise MemoryError(f"gemm: no memory to stage {shape[0]} tokens of width {shape[1]}")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dim of a float32 CPU tensor x [..., n] with weight [n], in one call."""
    lib = _loaded("rms_norm")
    _tensor("rms_norm", "x", x, F32, 0)
    _tensor("rms_norm", "weight", weight, F32, 1)
    n = x.shape[-1] if x.dim() else -1
    if weight.shape[0] != n:
        raise _bad_shapes("rms_norm", f"x is {tuple(x.shape)} and weight {tuple(weight.shape)}",
                          "x [..., n] and weight [n]")
    _contiguous("rms_norm", "weight", weight)
    if not eps >= 0:  # also refuses NaN
        raise ValueError(f"rms_norm: eps is {eps!r}; expected a number >= 0")
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.rms_norm_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // max(n, 1), n, eps,
                     _threads("rms_norm"))
    return out


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 block_size: int, window: int | None, scale: float) -> torch.Tensor:
    """One query per sequence q [B, heads, d] over one layer's cache k, v [kv_heads, slots, d] through block
    tables [B, width] and context lengths [B] -> [B, heads * d]. float32 CPU tensors; int64 tables and lens."""
    lib = _loaded("paged_decode")
    b, heads, kv_heads, d, width, slots = _decode_operands(q, k, v, tables, lens, block_size, window)
    q, tables, lens = q.contiguous(), tables.contiguous(), lens.contiguous()
    out = torch.empty(b, heads, d, dtype=F32)
    status = lib.paged_decode_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                                  out.data_ptr(), b, heads, kv_heads, d, width, block_size, slots * d, window or 0,
                                  scale, _threads("paged_decode"))
    if status == -2:  # the kernel checks lengths and block ids once per call, before it reads any key
        raise _table_error(tables, lens, block_size, slots // block_size)
    if status != 0:
        raise MemoryError(f"paged_decode: no memory for the scores of {b} sequences up to {int(lens.max())} tokens")
    return out.view(b, heads * d)


def _decode_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                     block_size: int, window: int | None) -> tuple[int, int, int, int, int, int]:
    """paged_decode's (B, heads, kv_heads, d, width, slots), after checking the dtypes, devices and shapes it reads."""
    _tensor("paged_decode", "q", q, F32, 3)
    _tensor("paged_decode", "k", k, F32, 3)
    _tensor("paged_decode", "v", v, F32, 3)
    _tensor("paged_decode", "tables", tables, I64, 2)
    _tensor("paged_decode", "lens", lens, I64, 1)
    b, heads, d = q.shape
    kv_heads, slots, kd = shape = k.shape
    strides = k.stride()
    if v.shape != shape or v.stride() != strides or strides != (slots * kd, kd, 1):
        raise _bad_shapes("paged_decode", f"k is {tuple(shape)} with strides {strides} and v {tuple(v.shape)} "
                          f"with strides {v.stride()}", "one layer's contiguous [kv_heads, slots, d] each")
    if d != kd or d == 0 or kv_heads == 0 or heads % kv_heads:
        raise _bad_shapes("paged_decode", f"q is {tuple(q.shape)} and k {tuple(shape)}",
                          "q [B, heads, d] and k [kv_heads, slots, d] with the same d and heads a multiple of kv_heads")
    rows, width = tables.shape
    if rows != b or lens.shape[0] != b:
        raise _bad_shapes("paged_decode", f"q is {tuple(q.shape)}, tables {tuple(tables.shape)} and lens "
                          f"{tuple(lens.shape)}", f"one table row and one length per sequence ({b})")
    if not 1 <= block_size <= slots or slots % block_size:
        raise ValueError(f"paged_decode: block_size is {block_size}; expected a divisor of the cache's {slots} slots")
    if window is not None and window < 1:
        raise ValueError(f"paged_decode: window is {window}; expected None (full context) or at least 1")
    return b, heads, kv_heads, d, width, slots


def _table_error(tables: torch.Tensor, lens: torch.Tensor, block_size: int, num_blocks: int) -> ValueError:
    """The error naming the first length or block id the kernel refused."""
    width = tables.shape[1]
    for b, n in enumerate(lens.tolist()):
        if not 1 <= n <= width * block_size:
            return ValueError(f"paged_decode: lens[{b}] is {n}; expected 1..{width * block_size} (its table's "
                              f"{width} blocks of {block_size} tokens)")
        row = tables[b, :(n - 1) // block_size + 1].tolist()
        for i, block in enumerate(row):
            if not 0 <= block < num_blocks:
                return ValueError(f"paged_decode: tables[{b}, {i}] is {block}; expected a block id in "
                                  f"0..{num_blocks - 1} (the cache's {num_blocks} blocks)")
    return ValueError(f"paged_decode: the kernel refused tables {tables.tolist()} with lens {lens.tolist()}")
