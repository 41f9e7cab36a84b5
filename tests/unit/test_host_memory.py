"""A CPU worker keeps step-sized buffers in its heap: repeating a step's allocations stops page-faulting."""
import platform
import subprocess
import sys

import pytest

# Runs a layer-shaped "step" (6, 48 and 24 MiB activations of 2048 tokens) a few times, then prints the minor page
# faults of four more. A fresh interpreter, so the malloc setting does not leak into the test process.
PROBE = """
import resource, sys, torch
from actors.shard.host_memory import keep_step_buffers
if sys.argv[1] == "keep":
    assert keep_step_buffers()
def step():
    x = torch.ones(2048, 768)
    h = torch.ones(2048, 6144)  # well over glibc's own adaptive limit (32 MiB): mapped and unmapped by default
    y = h[:, :3072] * h[:, 3072:]
    return float(x.sum() + y.sum())
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    """Minor page faults of four probe steps, with ("keep") or without ("plain") `keep_step_buffers`."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.slow  # two fresh interpreters that import torch and touch 100 MiB each
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_step_buffers_stops_page_faults_on_repeated_steps() -> None:
    """By default each step faults its 48 MiB buffer in again (12k pages); kept, the heap serves it already mapped."""
    plain, kept = faults("plain"), faults("keep")
    # The probe measures something: glibc maps and unmaps that buffer every step, so it faults again, at least one
    # buffer's 12k pages over the four (the kernel may map pages in bigger runs: 55k is usual, a fresh-clone CI run
    # once counted 18k).
    assert plain > 12288, plain
    # Kept, the count is 6k or (some runs on these VMs) 18k of the ~55k: always well under half.
    assert kept < plain / 2, (kept, plain)


def test_cpu_cache_budget_is_capped_by_half_the_available_memory(tmp_path) -> None:
    """The configured budget stands when the host has room; otherwise half of MemAvailable; unreadable: as set."""
    from actors.shard.host_memory import cpu_cache_budget

    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemAvailable:    2000000 kB\n")
    assert cpu_cache_budget(4 * 2**30, str(info)) == 1000000 * 1024
    assert cpu_cache_budget(2**20, str(info)) == 2**20
    assert cpu_cache_budget(4 * 2**30, str(tmp_path / "missing")) == 4 * 2**30


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/statm")
def test_kv_cache_takes_host_pages_only_as_tokens_fill_it() -> None:
    """A 2 GiB CPU cache costs almost no resident memory until written, and reads as zeros."""
    import torch

    from actors.shard.kv_cache import PagedKVCache

    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    before = resident_mib()
    cache = PagedKVCache(16, 4096, 16, 4, 64, torch.float32, torch.device("cpu"))  # 2 GiB
    assert cache.kv.numel() * 4 == 2 * 2**30
    assert resident_mib() - before < 64
    assert float(cache.kv[15, 1, 3, -16:].abs().sum()) == 0.0
    cache.k[0].fill_(1.0)  # one layer's K: 64 MiB
    assert resident_mib() - before >= 60


def test_freeze_startup_heap_takes_live_objects_out_of_full_collections() -> None:
    """After the freeze the objects alive then are frozen, and a full collection no longer walks them."""
    import gc

    from actors.shard.host_memory import freeze_startup_heap

    kept = [{"i": i} for i in range(200_000)]  # long-lived state, as a server holds after start-up
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert all(not gc.is_finalized(x) for x in kept[:3])
    finally:
        gc.unfreeze()
