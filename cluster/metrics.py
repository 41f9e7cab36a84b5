"""A replica's health in numbers: grid balance flags, the status table, and Prometheus text."""
from __future__ import annotations

from typing import Any

SPREAD_LIMIT_PCT = 10.0  # more spread than this within a TP group is flagged
ALLREDUCE_LIMIT_PCT = 10.0  # all-reduce share of step time above this is flagged


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


def prometheus_text(replica: str, engine: dict[str, float], workers: list[dict[str, Any]]) -> str:
    """Engine and per-worker gauges in Prometheus text format (names documented in the README)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        lines.extend([f"# HELP gridserve_{name} {help_}", f"# TYPE gridserve_{name} {kind}"])
        for labels, value in samples:
            tags = ",".join(f'{k}="{v}"' for k, v in {"replica": replica, **labels}.items())
            lines.append(f"gridserve_{name}{{{tags}}} {float(value)}")

    for name, (kind, help_) in ENGINE_METRICS.items():
        metric(name, kind, help_, [({}, engine[name])])
    for name, (key, help_) in WORKER_METRICS.items():
        metric(name, "gauge", help_, [({"stage": w["pp_rank"], "tp_rank": w["tp_rank"]}, w[key]) for w in workers])
    return "\n".join(lines) + "\n"


ENGINE_METRICS = {
    "requests_running": ("gauge", "Sequences in the running batch."),
    "requests_waiting": ("gauge", "Sequences waiting for admission."),
    "kv_cache_usage": ("gauge", "Share of KV-cache blocks in use."),
    "kv_cache_blocks": ("gauge", "KV-cache blocks of this replica."),
    "preemptions_total": ("counter", "Sequences preempted for KV space."),
    "steps_total": ("counter", "Engine steps run."),
    "prompt_tokens_total": ("counter", "Prompt tokens prefilled (prefix-cache hits excluded)."),
    "prefix_cache_hit_tokens_total": ("counter", "Prompt tokens whose KV blocks came from the prefix cache."),
    "prefix_cache_queried_tokens_total": ("counter", "Tokens of admitted sequences (hit rate = hits / this)."),
    "generation_tokens_total": ("counter", "Tokens generated."),
    "ttft_seconds_p50": ("gauge", "Time to first token, median of recent requests."),
    "itl_seconds_p50": ("gauge", "Inter-token latency, median of recent tokens."),
    "e2e_seconds_p50": ("gauge", "Request latency from submit to last token, median of recent requests."),
}
WORKER_METRICS = {
    "worker_weight_bytes": ("weight_bytes", "Parameter bytes a worker holds."),
    "worker_kv_cache_bytes": ("kv_bytes", "KV-cache bytes a worker allocated."),
    "worker_host_memory_bytes": ("host_rss_bytes", "Resident host memory of the worker process."),
    "worker_device_memory_bytes": ("device_bytes", "CUDA memory allocated by torch in the worker."),
    "worker_busy_percent": ("busy_pct", "Share of wall time the worker spent in steps (recent steps)."),
    "worker_allreduce_percent": ("allreduce_pct", "Share of step time spent in TP collectives (recent steps)."),
    "worker_step_milliseconds": ("step_ms", "Mean step time of the worker (recent steps)."),
    "worker_handoff_milliseconds": ("handoff_ms", "Median time from the previous stage finishing a step to this "
                                    "worker starting it: activation transfer + dispatch + queueing (stage > 0)."),
}
