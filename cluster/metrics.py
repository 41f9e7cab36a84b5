"""A replica's health in numbers: Prometheus collectors (own registry per replica), grid balance flags, the
status table."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

SPREAD_LIMIT_PCT = 10.0  # more spread than this within a TP group is flagged
ALLREDUCE_LIMIT_PCT = 10.0  # all-reduce share of step time above this is flagged
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RequestMetrics:
    """Per-request histograms and counters, observed by the engine as requests move (names follow vLLM's
    `vllm:*` metrics with a `gridserve_` prefix; histograms, unlike medians, add up across replicas)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        names, values = list(labels), list(labels.values())

        def hist(name: str, help_: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, help_, names, buckets=buckets, registry=registry).labels(*values)

        self.ttft = hist("gridserve_time_to_first_token_seconds", "Time from submit to the first token.",
                         LATENCY_BUCKETS)
        self.itl = hist("gridserve_inter_token_latency_seconds", "Time between two tokens of one request.",
                        LATENCY_BUCKETS)
        self.e2e = hist("gridserve_e2e_request_latency_seconds", "Time from submit to the last token.",
                        LATENCY_BUCKETS)
        self.queue = hist("gridserve_request_queue_time_seconds", "Time from submit to the first scheduled step.",
                          LATENCY_BUCKETS)
        self.prompt_tokens = hist("gridserve_request_prompt_tokens", "Prompt tokens per finished request.",
                                  TOKEN_BUCKETS)
        self.generation_tokens = hist("gridserve_request_generation_tokens", "Tokens generated per finished "
                                      "request.", TOKEN_BUCKETS)
        self._finished = Counter("gridserve_request_success", "Finished requests by finish reason.",
                                 [*names, "finished_reason"], registry=registry)
        self._values = values

    def finished(self, reason: str, prompt_tokens: int, generation_tokens: int) -> None:
        """Count one request that ended (stop, length, abort or error)."""
        self._finished.labels(*self._values, reason).inc()
        if reason in ("stop", "length"):
            self.prompt_tokens.observe(prompt_tokens)
            self.generation_tokens.observe(generation_tokens)


class SnapshotCollector(Collector):
    """Counters and gauges read from the replica's snapshot at scrape time (the engine keeps them as ints)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], labels: dict[str, str]) -> None:
        self.snapshot, self.labels = snapshot, labels

    def collect(self) -> Iterator[Any]:
        """Engine counters and gauges, then one gauge per worker metric labelled by stage and TP rank."""
        st = self.snapshot()
        names, values = list(self.labels), list(self.labels.values())
        for key, (name, kind, help_) in ENGINE_METRICS.items():
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_, labels=names)
            family.add_metric(values, float(st["engine"][key] if key in st["engine"] else st[key]))
            yield family
        for key, (name, help_) in WORKER_METRICS.items():
            family = GaugeMetricFamily(name, help_, labels=[*names, "stage", "tp_rank"])
            for w in st["workers"]:
                family.add_metric([*values, str(w["pp_rank"]), str(w["tp_rank"])], float(w[key]))
            yield family


class ReplicaMetrics:
    """Everything /metrics shows for one replica, in a registry of its own (never the process-global one)."""

    def __init__(self, replica: str, model_name: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "replica": replica}
        self.requests = RequestMetrics(self.registry, labels)
        self.registry.register(SnapshotCollector(snapshot, labels))

    def text(self) -> bytes:
        """The Prometheus text exposition (label values escaped by prometheus_client)."""
        return generate_latest(self.registry)


def spread_pct(values: list[float]) -> float:
    """(max - min) / max in percent; 0 for empty or all-zero."""
    top = max(values, default=0.0)
    return 100.0 * (top - min(values)) / top if top > 0 else 0.0


def grid_flags(workers: list[dict[str, Any]]) -> list[str]:
    """Imbalance within each TP group (memory, busy %) and all-reduce shares above the limit."""
    flags = []
    for stage in sorted({w["pp_rank"] for w in workers}):
        group = [w for w in workers if w["pp_rank"] == stage]
        mem = spread_pct([float(w["weight_bytes"] + w["kv_bytes"]) for w in group])
        busy = spread_pct([w["busy_pct"] for w in group])
        if mem > SPREAD_LIMIT_PCT:
            flags.append(f"stage {stage}: memory differs by {mem:.0f}% across TP ranks")
        if busy > SPREAD_LIMIT_PCT and min(w["steps"] for w in group) > 0:
            flags.append(f"stage {stage}: utilization differs by {busy:.0f}% across TP ranks")
    for w in workers:
        if w["steps"] and w["allreduce_pct"] > ALLREDUCE_LIMIT_PCT:
            flags.append(f"stage {w['pp_rank']} rank {w['tp_rank']}: all-reduce is {w['allreduce_pct']:.0f}% of "
                         "step time (more TP than this model needs, or a slow interconnect)")
    return flags


def status_table(status: dict[str, Any]) -> str:
    """One replica's grid as text: stage x TP rank -> node, device, memory, busy %, all-reduce %."""
    mib = 2**20
    e = status["engine"]
    rows = [f"replica {status['replica']}: tp={status['tp']} pp={status['pp']}, {e['requests_running']} running, "
            f"{e['requests_waiting']} waiting, KV {100 * e['kv_cache_usage']:.0f}% used, prefix-cache hits "
            f"{100 * e['prefix_cache_hit_tokens_total'] / max(1, e['prefix_cache_queried_tokens_total']):.0f}%, "
            f"grid rebuilds {status['rebuilds']}",
            f"  {'stage':>5} {'rank':>4} {'node':>10} {'device':>8} {'weights MiB':>11} {'KV MiB':>8} {'RSS MiB':>8} "
            f"{'GPU MiB':>8} {'busy %':>6} {'all-reduce %':>12} {'step ms':>8} {'hand-off ms':>11}"]
    for w in status["workers"]:
        rows.append(f"  {w['pp_rank']:>5} {w['tp_rank']:>4} {w['node_id'][:10]:>10} {w['device']:>8} "
                    f"{w['weight_bytes'] / mib:>11.1f} {w['kv_bytes'] / mib:>8.1f} {w['host_rss_bytes'] / mib:>8.0f} "
                    f"{w['device_bytes'] / mib:>8.0f} {w['busy_pct']:>6.1f} {w['allreduce_pct']:>12.1f} "
                    f"{w['step_ms']:>8.2f} {w['handoff_ms']:>11.2f}")
    rows += [f"  ! {flag}" for flag in status["flags"]] or ["  no imbalance or all-reduce flags"]
    return "\n".join(rows)


# snapshot key -> (Prometheus name, kind, help); counters get `_total` appended by prometheus_client.
ENGINE_METRICS = {
    "requests_running": ("gridserve_num_requests_running", "gauge", "Sequences in the running batch."),
    "requests_waiting": ("gridserve_num_requests_waiting", "gauge", "Sequences waiting for admission."),
    "kv_cache_usage": ("gridserve_kv_cache_usage_perc", "gauge", "Share of KV-cache blocks in use (0-1)."),
    "kv_cache_blocks": ("gridserve_kv_cache_blocks", "gauge", "KV-cache blocks of this replica."),
    "rebuilds": ("gridserve_grid_rebuilds", "counter", "Times this replica replaced its failed grid."),
    "preemptions_total": ("gridserve_num_preemptions", "counter", "Sequences preempted for KV space."),
    "steps_total": ("gridserve_engine_steps", "counter", "Engine steps run."),
    "prompt_tokens_total": ("gridserve_prompt_tokens", "counter", "Prompt tokens prefilled (prefix-cache hits "
                            "excluded)."),
    "generation_tokens_total": ("gridserve_generation_tokens", "counter", "Tokens generated."),
    "prefix_cache_hit_tokens_total": ("gridserve_prefix_cache_hits", "counter", "Prompt tokens whose KV blocks "
                                      "came from the prefix cache."),
    "prefix_cache_queried_tokens_total": ("gridserve_prefix_cache_queries", "counter", "Tokens of admitted "
                                          "sequences (hit rate = hits / queries)."),
    "spec_decode_draft_tokens_total": ("gridserve_spec_decode_num_draft_tokens", "counter", "Speculative draft "
                                       "tokens verified (n-gram)."),
    "spec_decode_accepted_tokens_total": ("gridserve_spec_decode_num_accepted_tokens", "counter", "Draft tokens "
                                          "kept (acceptance rate = accepted / draft)."),
}
# worker stats key -> (Prometheus name, help); labelled by stage and tp_rank.
WORKER_METRICS = {
    "weight_bytes": ("gridserve_worker_weight_bytes", "Parameter bytes a worker holds."),
    "kv_bytes": ("gridserve_worker_kv_cache_bytes", "KV-cache bytes a worker allocated."),
    "host_rss_bytes": ("gridserve_worker_host_memory_bytes", "Resident host memory of the worker process."),
    "device_bytes": ("gridserve_worker_device_memory_bytes", "CUDA memory allocated by torch in the worker."),
    "busy_pct": ("gridserve_worker_busy_percent", "Share of wall time the worker spent in steps (recent steps)."),
    "allreduce_pct": ("gridserve_worker_allreduce_percent", "Share of step time spent in TP collectives (recent "
                      "steps; CUDA events on CUDA, the host clock on CPU)."),
    "step_ms": ("gridserve_worker_step_milliseconds", "Mean step time of the worker (recent steps)."),
    "torch_threads": ("gridserve_worker_torch_threads", "Python threads that ran the worker's torch work; each keeps "
                      "its own OpenMP pool, and more than one slows multi-threaded CPU steps (1 expected)."),
    "handoff_ms": ("gridserve_worker_handoff_milliseconds", "Median time from the previous stage finishing a step "
                   "to this worker starting it: activation transfer + dispatch + queueing (stage > 0)."),
}
