"""The tensor-parallel group handle that parallel layers receive explicitly."""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from actors.shard.shm import ShmGroup


class TPGroup:
    """One stage's tensor-parallel group: rank, size and the collectives layers call in `forward`."""

    def __init__(self, rank: int, size: int, process_group: Any = None, shm: ShmGroup | None = None) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"tp rank {rank} is outside a group of size {size}")
        if size > 1 and process_group is None and shm is None:
            raise ValueError(f"a TP group of size {size} needs a torch.distributed process group or a ShmGroup")
        self.rank = rank
        self.size = size
        self.process_group = process_group
        self.shm = shm  # same-host ranks: collectives through shared memory, the process group as fallback
        self.comm_seconds = 0.0  # wall time spent inside collectives, read by metrics
        self.num_collectives = 0

    @classmethod
    def single(cls) -> TPGroup:
        """A group of one: every collective is the identity."""
        return cls(0, 1, None)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group in place and return it."""
        if self.size == 1:
            return x
        start = time.perf_counter()
        if self.shm is not None and self.shm.fits(x):
            self.shm.all_reduce(x)
        else:
            dist.all_reduce(x, group=self.process_group)
        self._account(start)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim` (same shape on every rank)."""
        if self.size == 1:
            return x
        start = time.perf_counter()
        if self.shm is not None and self.shm.fits(x):
            out = self.shm.all_gather(x, dim)
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x.contiguous(), group=self.process_group)
            out = torch.cat(parts, dim=dim)
        self._account(start)
        return out

    def _account(self, start: float) -> None:
        """Record one collective's wall time (CPU gloo is synchronous, so this is its true cost)."""
        self.comm_seconds += time.perf_counter() - start
        self.num_collectives += 1
