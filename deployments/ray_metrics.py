"""The replica's snapshot as Ray metrics (`ray.util.metrics`): scraped by Ray's Prometheus exporter and dashboard.

Only the snapshot's values (engine counters and gauges, per-worker gauges) go here, as gauges set from each
snapshot; the request histograms live in the replica's own registry, served at /metrics.
"""
from __future__ import annotations

from typing import Any

from cluster.metrics import ENGINE_METRICS, WORKER_METRICS


class RayMetrics:
    """Gauges named like /metrics' (`gridserve_...`), tagged by replica (and stage, TP rank)."""

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self.engine = {key: Gauge(name, help_, tag_keys=("replica",)) for key, (name, _, help_) in
                       ENGINE_METRICS.items()}
        self.workers = {key: Gauge(name, help_, tag_keys=("replica", "stage", "tp_rank"))
                        for key, (name, help_) in WORKER_METRICS.items()}

    def update(self, status: dict[str, Any]) -> None:
        """Set every gauge from one snapshot."""
        replica = status["replica"]
        for key, gauge in self.engine.items():
            gauge.set(float(status["engine"].get(key, status.get(key, 0))), tags={"replica": replica})
        for key, gauge in self.workers.items():
            for w in status["workers"]:
                gauge.set(float(w[key]), tags={"replica": replica, "stage": str(w["pp_rank"]),
                                               "tp_rank": str(w["tp_rank"])})
