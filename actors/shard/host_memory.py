"""Keep a CPU worker's per-step activation buffers in its heap instead of fresh pages from the kernel each step.

glibc serves allocations above its mmap threshold (at most 32 MiB when it adapts it) with a new mapping and gives
the pages back on free, and trims the heap top back to the kernel once 2x that threshold is free. A prefill step of
bench-125m (16 x 128 tokens) allocates 6-32 MiB activations per layer, so every step page-faulted and zeroed them
again: raising both limits took that step from 2.53 s to 2.20 s on a 2-core box (in process; decode steps, whose
buffers are small, were unchanged; tests/unit/test_host_memory.py counts the page faults). vLLM's CPU path gets the
same from tcmalloc, which it preloads; this needs no extra library.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import mmap

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
STEP_BUFFER_MAX_BYTES = 256 * 2**20  # larger single buffers still get their own mapping (returned when freed)
KEEP_FREE_MAX_BYTES = 512 * 2**20  # free heap top kept for the next step; beyond it the heap is trimmed
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: map pages in, writable, without writing to them


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, or None where there is none to load."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name is not None else None
    except OSError:
        return None


def keep_step_buffers() -> bool:
    """Return load-time garbage to the kernel, then keep step-sized buffers in the heap; False where not glibc.

    Called once the shard is loaded: set before, the loader's freed temporaries would stay resident.
    """
    libc = _libc()
    mallopt, malloc_trim = getattr(libc, "mallopt", None), getattr(libc, "malloc_trim", None)
    if mallopt is None or malloc_trim is None:  # no libc, or musl or another libc without these
        return False
    malloc_trim(0)
    # mallopt answers 1 when it took the value; fixing the threshold also stops glibc from adapting it.
    mapped = mallopt(M_MMAP_THRESHOLD, STEP_BUFFER_MAX_BYTES)
    trimmed = mallopt(M_TRIM_THRESHOLD, KEEP_FREE_MAX_BYTES)
    return bool(mapped == 1 and trimmed == 1)  # ctypes answers untyped ints


def cpu_cache_budget(configured: int, meminfo: str = "/proc/meminfo") -> int:
    """The KV-cache bytes a CPU worker takes: `configured`, at most half the host memory available now.

    Half leaves room for the weights and the other processes. What a full batch holds is faulted in at start, the
    rest (prefix-cache room) as tokens fill it: that part, if the host cannot hold it, would fail under load.
    """
    try:
        with open(meminfo) as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024  # the file counts kB
    except (OSError, KeyError, ValueError):  # not Linux: the configured budget is all there is
        return configured
    return min(configured, available // 2)


def freeze_startup_heap() -> None:
    """Move every object alive now (imports, the loaded model's Python objects) out of the collector's reach.

    A full collection walks every tracked object: ~0.3 s with Ray, Serve, torch and transformers imported, a stall
    that lands on whichever token is being served. Frozen, the long-lived heap is skipped and collections scan
    only what serving created since.
    """
    gc.collect()
    gc.freeze()


def populate(address: int, nbytes: int) -> bool:
    """Fault the pages of [address, address + nbytes) in, writable, leaving their contents as they are.

    False where the kernel cannot (not Linux, or before 5.14): the pages then come in when first written.
    """
    libc = _libc()
    if libc is None or nbytes <= 0:
        return libc is not None
    start = address - address % mmap.PAGESIZE
    done = libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), MADV_POPULATE_WRITE)
    return bool(done == 0)
