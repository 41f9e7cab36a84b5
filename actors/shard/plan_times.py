"""The least time each matmul path has taken on this machine, kept across worker starts, for matmul_plan.

A worker times the paths while the rest of its server starts beside it (Serve's controller, proxy and replicas
import and spin up on the same cores), so one start's timings are noisy: the same code picked gemm, oneDNN or even
the few-token gemv for 9-32 tokens in three starts, and the served speed moved with the pick. The least time a path
has ever taken is the best estimate of what it costs when it runs alone, so every start merges its timings into
the stored ones (per path and token count, the minimum) and plans on the merged figures: plans settle after a few
starts instead of changing with each.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch

from actors.shard import kernel_build

log = logging.getLogger(__name__)
READ_BYTES = 512 << 20  # read_bandwidth's buffer
SOURCES = [Path(__file__).with_name(name) for name in ("matmul_plan.py", "quant.py", "cpu_gemm.py")]


def store_path() -> Path:
    """The file for this machine, torch and code: $GRIDSERVE_CACHE/plans (else ~/.cache/gridserve/plans)."""
    parts = [kernel_build.key().encode(), torch.__version__.encode(), cpu_model().encode()]
    parts += [path.read_bytes() for path in SOURCES if path.exists()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    return kernel_build.kernel_dir().parent / "plans" / f"matmul-times-{digest}.json"


def cpu_model() -> str:
    """The CPU's model name line ('' where /proc/cpuinfo has none): machines with one flag set can differ in speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("model name")), "")


@lru_cache(maxsize=1)
def read_bandwidth() -> float:
    """Bytes per second the torch threads read from memory here: the best of three sums over 512 MiB (more than
    the caches of the machines we run on), measured once per process."""
    data = torch.ones(READ_BYTES // 4)
    data.sum()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return READ_BYTES / best


def merged(entry: str, times: Mapping[str, Sequence[float]], path: Path | None = None) -> dict[str, list[float]]:
    """`times` (seconds per path, one per token-count bucket) merged with what is stored under `entry`: the least of
    the two per path and bucket; stored back. An unreadable or unwritable store leaves `times` as they are."""
    path = path or store_path()
    out = {p: list(t) for p, t in times.items()}
    try:
        stored = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        stored = {}
    old = stored.get(entry, {}) if isinstance(stored, dict) else {}
    for p, seconds in out.items():
        before = old.get(p) if isinstance(old, dict) else None
        if isinstance(before, list) and len(before) == len(seconds):
            out[p] = [min(a, float(b)) for a, b in zip(seconds, before)]
    stored = stored if isinstance(stored, dict) else {}
    stored[entry] = out
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".times-")
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f)
        os.replace(tmp, path)  # workers starting together never read a half-written file
    except OSError as e:
        log.warning("matmul timings not stored in %s (%s): this start plans on its own timings", path, e)
    return out
