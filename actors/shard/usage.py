"""Per-worker utilization over recent steps: busy share of wall time and all-reduce share of busy time."""
from __future__ import annotations

import os
import statistics
import time
from collections import deque

import torch


class StepWindow:
    """The last `size` steps of one worker as (start, end, seconds in collectives)."""

    def __init__(self, size: int = 256) -> None:
        self.steps: deque[tuple[float, float, float]] = deque(maxlen=size)
        self.handoffs: deque[float] = deque(maxlen=size)
        self.total = 0

    def record(self, start: float, end: float, comm_s: float, handoff_s: float | None = None) -> None:
        """Add one finished step (with the time its input took from the previous stage, if it had one)."""
        self.steps.append((start, end, comm_s))
        if handoff_s is not None:
            self.handoffs.append(handoff_s)
        self.total += 1

    def summary(self, now: float | None = None) -> dict[str, float]:
        """busy % of the wall since the window's first step, all-reduce % of busy time, mean step ms, median
        hand-off ms (previous stage done -> this stage starts: transfer, dispatch and any queueing)."""
        # Copies first: the worker's probe thread reads while its step thread records (list(deque) is atomic).
        steps, handoffs = list(self.steps), list(self.handoffs)
        handoff = 1000 * statistics.median(handoffs) if handoffs else 0.0
        if not steps:
            return {"steps": 0, "busy_pct": 0.0, "allreduce_pct": 0.0, "step_ms": 0.0, "handoff_ms": handoff}
        now = time.perf_counter() if now is None else now
        busy = sum(end - start for start, end, _ in steps)
        comm = sum(c for _, _, c in steps)
        wall = max(now - steps[0][0], busy, 1e-9)
        return {"steps": self.total, "busy_pct": 100 * busy / wall, "allreduce_pct": 100 * comm / max(busy, 1e-9),
                "step_ms": 1000 * busy / len(steps), "handoff_ms": handoff}


def memory_bytes(device: torch.device) -> dict[str, int]:
    """This process's resident host memory, and device memory allocated by torch on CUDA."""
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    gpu = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    return {"host_rss_bytes": rss, "device_bytes": gpu}
