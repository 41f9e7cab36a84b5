"""Joining a Ray cluster, or starting a local one sized for the grid."""
from __future__ import annotations

import math
import os

import ray

from cluster.config import GridServeConfig


def connect(cfg: GridServeConfig, address: str | None = None, grids: int = 1) -> bool:
    """Join `address` / RAY_ADDRESS, else start a loopback-only local Ray sized for `grids`; True if we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # A CPU box runs one worker per logical CPU slot; declare enough slots for the grids (they time-share cores).
    cpus = max(os.cpu_count() or 1, math.ceil(grids * cfg.world_size * cfg.cpus_per_worker) + 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    return True
