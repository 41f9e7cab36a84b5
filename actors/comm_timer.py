"""How a worker times its TP collectives: host clock on CPU, CUDA events on CUDA (Ray-free)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from actors.shard.shm import ShmGroup
from actors.shard.tp import TPGroup


class CudaSpans:
    """Device time of code spans, measured between CUDA events on the current stream.

    A host clock around an NCCL call measures the launch (microseconds); the collective itself runs later on
    the device. Events recorded before and after it on the compute stream bracket the real wait, and are read
    only when someone asks, so timing adds no synchronisation to the step.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.seconds = 0.0

    def start(self) -> torch.cuda.Event:
        """Mark the span's start on the current stream."""
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start: torch.cuda.Event) -> None:
        """Mark the span's end; its length is read later."""
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((start, end))

    def total(self) -> float:
        """Seconds of every span so far (waits for the last span's end event to complete)."""
        for start, end in self.pending:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0
        self.pending.clear()
        return self.seconds


class CudaTimedTPGroup(TPGroup):
    """A CUDA TP group (NCCL) whose `comm_seconds` is device time between CUDA events, not launch time."""

    def __init__(self, rank: int, size: int, process_group: Any) -> None:
        self.spans = CudaSpans()
        super().__init__(rank, size, process_group)

    @property
    def comm_seconds(self) -> float:
        """Device seconds spent in collectives so far."""
        return self.spans.total()

    @comm_seconds.setter
    def comm_seconds(self, value: float) -> None:
        self.spans.seconds = value  # TPGroup.__init__ resets the total

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group in place (NCCL), timed on the device."""
        if self.size == 1:
            return x
        start = self.spans.start()
        dist.all_reduce(x, group=self.process_group)
        self.spans.stop(start)
        self.num_collectives += 1
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim` (NCCL), timed on the device."""
        if self.size == 1:
            return x
        start = self.spans.start()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.process_group)
        out = torch.cat(parts, dim=dim)
        self.spans.stop(start)
        self.num_collectives += 1
        return out


def tp_group(rank: int, size: int, process_group: Any, shm: ShmGroup | None, device: torch.device) -> TPGroup:
    """The worker's TP group: CUDA-event timing on CUDA, the host clock on CPU (gloo and shm are synchronous)."""
    if device.type == "cuda":
        return CudaTimedTPGroup(rank, size, process_group)
    return TPGroup(rank, size, process_group, shm)
