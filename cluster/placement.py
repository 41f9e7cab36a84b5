"""Placement of one replica: its bundles (one per pipeline stage, so a TP group always shares a node), checks
against the cluster's nodes, and a bounded wait for the reservation."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from cluster.config import GridServeConfig

log = logging.getLogger("gridserve")

# A CPU worker's OpenMP threads spin a short while at a barrier, then sleep. libgomp's default (~300k rounds) keeps
# them spinning through the gap between steps, on cores the serving processes (engine, ingress, proxy) need;
# sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes every parallel region of a step pay a wake-up instead.
OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # either one set by the user wins
SPIN_ROUNDS = "10000"  # ~ the gap between two parallel regions of one step, well short of the gap between steps
# Ray gives this resource to the head node alone (ray._common.constants.HEAD_NODE_RESOURCE_NAME): a sliver of it
# pins an actor there, where the loss of any worker host cannot reach it
HEAD_NODE = {"node:__internal_head__": 0.001}


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node and how much of the workers' resource it has in total."""

    node_id: str
    address: str
    capacity: float


@dataclass(frozen=True)
class Layout:
    """Where a replica's workers go: one bundle per stage holding its whole TP group (Ray never splits a bundle
    across nodes), or one bundle per worker when TP may span nodes."""

    resource: str  # "GPU" or "CPU"
    per_worker: float  # amount of `resource` one worker takes
    tp: int
    pp: int
    per_stage: bool

    @classmethod
    def of(cls, cfg: GridServeConfig, resource: str) -> Layout:
        """The layout `cfg` asks for, with workers taking `resource`."""
        per = 1.0 if resource == "GPU" else cfg.cpus_per_worker
        return cls(resource, per, cfg.tensor_parallel_size, cfg.pipeline_parallel_size,
                   not cfg.allow_tp_across_nodes)

    @property
    def bundles(self) -> list[dict[str, float]]:
        """The placement-group bundles, stage-major."""
        if self.per_stage:
            return [{self.resource: self.tp * self.per_worker} for _ in range(self.pp)]
        return [{self.resource: self.per_worker} for _ in range(self.tp * self.pp)]

    def bundle_index(self, pp_rank: int, tp_rank: int) -> int:
        """The bundle worker (pp_rank, tp_rank) is scheduled into."""
        return pp_rank if self.per_stage else pp_rank * self.tp + tp_rank

    def worker_options(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Actor options of one worker: its share of the bundle; on CPU also its OpenMP spin count, unless `env`
        (default: this process's environment, which Ray passes on to workers) already sets one."""
        if self.resource == "GPU":
            return {"num_gpus": 1, "num_cpus": 0}
        options: dict[str, Any] = {"num_cpus": self.per_worker}
        if not any(name in (os.environ if env is None else env) for name in OPENMP_WAIT_VARS):
            options["runtime_env"] = {"env_vars": {"GOMP_SPINCOUNT": SPIN_ROUNDS}}
        return options


def worker_threads(resource: str, cpus_per_worker: float) -> int:
    """torch threads of one worker: 1 beside a GPU; on CPU its CPU share rounded up (0.5 CPU: 1 thread)."""
    return 1 if resource == "GPU" else max(1, math.ceil(cpus_per_worker))


def overlap_spares_the_step(resource: str, workers: int, cpus_per_worker: float) -> bool:
    """Whether the engine can work while a step runs without taking a core from it (async scheduling's default):
    GPU workers, or CPU workers whose threads (all counted on this node) leave it a core."""
    if resource == "GPU":
        return True
    return workers * worker_threads(resource, cpus_per_worker) < len(os.sched_getaffinity(0))


def async_scheduling_on(cfg: GridServeConfig, resource: str, workers: int) -> bool:
    """The config's async_scheduling, or where unset whether the engine's work can overlap a step of these workers
    (`resource`: "CPU" for tests' in-process grids too)."""
    if cfg.async_scheduling is not None:
        return cfg.async_scheduling
    on = overlap_spares_the_step(resource, workers, cfg.cpus_per_worker)
    log.info("async scheduling %s (default for %d %s worker(s) of %g CPUs here)", "on" if on else "off", workers,
             resource, cfg.cpus_per_worker)
    return on


def worker_resource(cfg: GridServeConfig, cluster_totals: dict[str, float]) -> str:
    """'GPU' or 'CPU': what each worker's bundle asks for."""
    if cfg.resource != "auto":
        return cfg.resource
    return "GPU" if cluster_totals.get("GPU", 0) > 0 else "CPU"


def alive_nodes(resource: str) -> list[NodeInfo]:
    """Alive nodes with their total amount of `resource`, biggest first."""
    import ray

    nodes = [NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"), float(n["Resources"].get(resource, 0)))
             for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: -n.capacity)


def plan_layout(cfg: GridServeConfig, nodes: list[NodeInfo], resource: str) -> Layout:
    """The replica's layout, refused at once (naming the sizes to change) if the cluster can never hold it."""
    layout = Layout.of(cfg, resource)
    tp, pp, per = layout.tp, layout.pp, layout.per_worker
    total = sum(n.capacity for n in nodes)
    shape = ", ".join(f"{n.address}/{n.node_id[:8]}: {n.capacity:g} {resource}" for n in nodes)
    if tp * pp * per > total:
        raise ValueError(f"the grid needs {tp * pp * per:g} {resource} (tensor_parallel_size={tp} x "
                         f"pipeline_parallel_size={pp}) but the cluster has {total:g} {resource} in total "
                         f"({shape}); add nodes or lower the parallel sizes")
    if not layout.per_stage:
        return layout
    largest = nodes[0].capacity if nodes else 0.0
    if largest < tp * per:
        raise ValueError(f"tensor_parallel_size={tp} needs {tp * per:g} {resource} on one node but the largest "
                         f"node has {largest:g} ({shape}); lower tensor_parallel_size and raise "
                         "pipeline_parallel_size, or set allow_tp_across_nodes=true to span nodes (slow)")
    groups = sum(int(n.capacity // (tp * per)) for n in nodes)
    if groups < pp:
        raise ValueError(f"the nodes hold {groups} TP groups of {tp * per:g} {resource} but "
                         f"pipeline_parallel_size={pp} needs {pp} ({shape}); add nodes or lower the sizes")
    return layout


def serve_bundles(cfg: GridServeConfig, layout: Layout) -> list[dict[str, float]]:
    """A Serve replica's placement group: bundle 0 for the replica actor, then the workers' bundles."""
    return [{"CPU": cfg.replica_cpus}] + layout.bundles


def serve_group(cfg: GridServeConfig) -> dict[str, Any]:
    """Serve deployment options that give each replica its placement group (checked against the connected
    cluster's nodes when Ray runs; as configured otherwise)."""
    import ray

    totals = ray.cluster_resources() if ray.is_initialized() else {}
    resource = worker_resource(cfg, totals)
    layout = plan_layout(cfg, alive_nodes(resource), resource) if totals else Layout.of(cfg, resource)
    return {"placement_group_bundles": serve_bundles(cfg, layout), "placement_group_strategy": "PACK",
            "ray_actor_options": {"num_cpus": cfg.replica_cpus}}


def create_replica_group(cfg: GridServeConfig, avoid: frozenset[str] = frozenset()) -> tuple[Any, Layout]:
    """Reserve one placement group for the replica's workers, off the nodes in `avoid` (ids of nodes found
    unreachable, which Ray may still list as alive), or raise within `placement_timeout_s`."""
    import ray
    from ray.util.placement_group import NODE_ID_LABEL_KEY, placement_group, remove_placement_group

    totals = ray.cluster_resources()
    resource = worker_resource(cfg, totals)
    layout = plan_layout(cfg, [n for n in alive_nodes(resource) if n.node_id not in avoid], resource)
    selector = [{NODE_ID_LABEL_KEY: f"!in({','.join(sorted(avoid))})"} for _ in layout.bundles] if avoid else None
    # PACK: stages share a node when one holds them (cheap hand-offs), else spread over nodes.
    pg = placement_group(layout.bundles, strategy="PACK", bundle_label_selector=selector)
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


def grids_that_fit(cfg: GridServeConfig) -> int:
    """How many grids the connected cluster can hold right now (`--replicas auto`)."""
    import ray

    free = ray.available_resources()
    if free.get("GPU", 0) >= cfg.world_size and cfg.resource != "CPU":
        return int(free["GPU"] // cfg.world_size)
    return max(1, int(free.get("CPU", 0) // (cfg.world_size * cfg.cpus_per_worker)))
