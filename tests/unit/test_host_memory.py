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
    # The probe measures something: glibc maps and unmaps that buffer every step (the kernel may map some pages in
    # bigger runs, so the count is not exact; a 32 MiB buffer once gave 28k of its 32k).
    assert plain > 4 * 8000, plain
    assert kept < plain / 4, (kept, plain)
