"""Placement of one replica: its bundles, which node each stage's TP group lands on, a bounded wait."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from cluster.config import GridServeConfig

NODE_LABEL = "ray.io/node-id"


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node and how much of the workers' resource it has in total."""

    node_id: str
    address: str
    capacity: float


@dataclass(frozen=True)
class Layout:
    """Bundles of one replica (stage-major: bundle i = stage i // tp, TP rank i % tp) and their pinning."""

    resource: str
    bundles: list[dict[str, float]]
    selectors: list[dict[str, str]] | None
    stage_nodes: list[str | None]


def worker_resource(cfg: GridServeConfig, cluster_totals: dict[str, float]) -> str:
    """'GPU' or 'CPU': what each worker's bundle asks for."""
    if cfg.resource != "auto":
        return cfg.resource
    return "GPU" if cluster_totals.get("GPU", 0) > 0 else "CPU"


def alive_nodes(resource: str) -> list[NodeInfo]:
    """Alive nodes with their total amount of `resource`, biggest first."""
    nodes = [NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"), float(n["Resources"].get(resource, 0)))
             for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: -n.capacity)


def plan_layout(cfg: GridServeConfig, nodes: list[NodeInfo], resource: str) -> Layout:
    """Pin each stage's TP group to one node, spreading stages over distinct nodes when there are enough."""
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    per = 1.0 if resource == "GPU" else cfg.cpus_per_worker
    bundle = {resource: per}
    total = sum(n.capacity for n in nodes)
    shape = ", ".join(f"{n.address}/{n.node_id[:8]}: {n.capacity:g} {resource}" for n in nodes)
    if tp * pp * per > total:
        raise ValueError(f"the grid needs {tp * pp * per:g} {resource} (tensor_parallel_size={tp} x "
                         f"pipeline_parallel_size={pp}) but the cluster has {total:g} {resource} in total "
                         f"({shape}); add nodes or lower the parallel sizes")
    if cfg.allow_tp_across_nodes:
        return Layout(resource, [dict(bundle) for _ in range(tp * pp)], None, [None] * pp)
    if not nodes or nodes[0].capacity < tp * per:
        largest = nodes[0].capacity if nodes else 0
        raise ValueError(f"tensor_parallel_size={tp} needs {tp * per:g} {resource} on one node but the largest "
                         f"node has {largest:g} ({shape}); lower tensor_parallel_size and raise "
                         "pipeline_parallel_size, or set allow_tp_across_nodes=true to span nodes (slow)")
    free = {n.node_id: n.capacity for n in nodes}
    stage_nodes: list[str | None] = []
    for stage in range(pp):
        # Prefer a node no stage uses yet (PP goes across nodes), then the one with most room left.
        fits = [n for n in nodes if free[n.node_id] >= tp * per]
        if not fits:
            raise ValueError(f"no node has room for the TP group of stage {stage} ({tp * per:g} {resource}) "
                             f"after placing stages 0..{stage - 1} ({shape}); add nodes or lower the sizes")
        best = min(fits, key=lambda n: (n.node_id in stage_nodes, -free[n.node_id]))
        free[best.node_id] -= tp * per
        stage_nodes.append(best.node_id)
    selectors = [{NODE_LABEL: stage_nodes[i // tp]} for i in range(tp * pp)]  # type: ignore[dict-item]
    return Layout(resource, [dict(bundle) for _ in range(tp * pp)], selectors, stage_nodes)


def create_replica_group(cfg: GridServeConfig) -> tuple[PlacementGroup, Layout]:
    """Reserve one placement group for the replica, or raise within `placement_timeout_s`."""
    totals = ray.cluster_resources()
    resource = worker_resource(cfg, totals)
    layout = plan_layout(cfg, alive_nodes(resource), resource)
    kwargs: dict[str, Any] = {"bundle_label_selector": layout.selectors} if layout.selectors else {}
    pg = placement_group(layout.bundles, strategy="PACK", **kwargs)
    start = time.monotonic()
    if not pg.wait(timeout_seconds=cfg.placement_timeout_s):
        remove_placement_group(pg)
        needed = sum(b[resource] for b in layout.bundles)
        raise TimeoutError(f"the grid's placement group ({needed:g} {resource} as {len(layout.bundles)} bundles) "
                           f"was not ready after {time.monotonic() - start:.0f} s (placement_timeout_s="
                           f"{cfg.placement_timeout_s:g}); available now: "
                           f"{ray.available_resources().get(resource, 0):g} {resource} of "
                           f"{totals.get(resource, 0):g}; free resources or lower the parallel sizes")
    return pg, layout
