"""What a replica needs of its grid (ReplicaGrid), and how it turns work away for now (ReplicaUnavailable).

`cluster.replica` re-exports these names; the Serve and batch faces import them from there.
"""
from __future__ import annotations

from typing import Any, Protocol

from cluster.engine import StepGrid
from cluster.lora import LoraGrid

RETRY_AFTER_REBUILD_S = 5  # Retry-After while a failed grid is rebuilt (a rebuild reloads every shard)
RETRY_AFTER_OVERLOAD_S = 1  # Retry-After when the waiting queue is full (a few decode steps free seats)


class ReplicaGrid(StepGrid, LoraGrid, Protocol):
    """What a replica needs of its grid beyond stepping: LoRA slots, per-worker stats and teardown."""

    def worker_stats(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Each worker's place, memory and recent utilization, stage-major."""
        ...

    def close_dag(self) -> None:
        """Release step machinery bound to the current event loop."""
        ...

    def shutdown(self) -> None:
        """Stop every worker."""
        ...


class ReplicaUnavailable(RuntimeError):
    """The replica cannot take the request now; retry after `retry_after_s` seconds. `rebuilding`: its grid failed
    and is being rebuilt (another replica can take the request now), not merely a full queue."""

    def __init__(self, message: str, retry_after_s: int, rebuilding: bool = False) -> None:
        super().__init__(message)
        self.retry_after_s, self.rebuilding = retry_after_s, rebuilding
