"""The replica's numbers as Ray metrics (`ray.util.metrics`): scraped by Ray's Prometheus exporter and dashboard."""
from __future__ import annotations

from typing import Any

from cluster.metrics import ENGINE_METRICS, WORKER_METRICS


class RayMetrics:
    """Gauges named like the /metrics endpoint's (`gridserve_...`), tagged by replica (and stage, TP rank)."""

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self.engine = {name: Gauge(f"gridserve_{name}", help_, tag_keys=("replica",))
                       for name, (_, help_) in ENGINE_METRICS.items()}
        self.workers = {name: Gauge(f"gridserve_{name}", help_, tag_keys=("replica", "stage", "tp_rank"))
                        for name, (_, help_) in WORKER_METRICS.items()}

    def update(self, status: dict[str, Any]) -> None:
        """Set every gauge from one `/status` snapshot."""
        replica = status["replica"]
        for name, gauge in self.engine.items():
            gauge.set(float(status["engine"][name]), tags={"replica": replica})
        for name, (key, _) in WORKER_METRICS.items():
            for w in status["workers"]:
                self.workers[name].set(float(w[key]), tags={"replica": replica, "stage": str(w["pp_rank"]),
                                                            "tp_rank": str(w["tp_rank"])})
