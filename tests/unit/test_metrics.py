"""Prometheus metrics of a replica: own registry, parseable text, histograms that add up across replicas."""
from __future__ import annotations

from collections import Counter
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import LATENCY_BUCKETS, ReplicaMetrics

TTFT = "gridserve_time_to_first_token_seconds"


def snapshot(running: int) -> dict[str, Any]:
    """A replica snapshot with one worker (the shape Replica.snapshot returns)."""
    engine = {"requests_running": running, "requests_waiting": 0, "kv_cache_usage": 0.25, "kv_cache_blocks": 64,
              "preemptions_total": 1, "prefix_cache_hit_tokens_total": 8, "prefix_cache_queried_tokens_total": 20,
              "steps_total": 5, "prompt_tokens_total": 12, "generation_tokens_total": 9,
              "spec_decode_draft_tokens_total": 6, "spec_decode_accepted_tokens_total": 4}
    worker = {"pp_rank": 0, "tp_rank": 0, "weight_bytes": 10, "kv_bytes": 20, "host_rss_bytes": 30,
              "device_bytes": 0, "busy_pct": 50.0, "allreduce_pct": 0.0, "step_ms": 1.0, "handoff_ms": 0.0,
              "torch_threads": 1}
    return {"rebuilds": 0, "engine": engine, "workers": [worker]}


def buckets(text: str, name: str) -> Counter[str]:
    """Cumulative bucket counts of histogram `name` by upper bound."""
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{name}_bucket":
                out[s.labels["le"]] += s.value
    return out


def test_histograms_of_two_replicas_sum_to_the_histogram_of_all_observations() -> None:
    """What a Prometheus sum() over replicas computes equals one histogram fed every observation."""
    a, b, both = (ReplicaMetrics(name, "tiny", lambda: snapshot(1)) for name in ("r0", "r1", "all"))
    values_a, values_b = [0.003, 0.02, 0.5, 3.0], [0.0005, 0.02, 12.0]
    for v in values_a:
        a.requests.ttft.observe(v)
    for v in values_b:
        b.requests.ttft.observe(v)
    for v in values_a + values_b:
        both.requests.ttft.observe(v)
    summed = buckets(a.text().decode(), TTFT) + buckets(b.text().decode(), TTFT)
    assert summed == buckets(both.text().decode(), TTFT)
    assert summed["+Inf"] == 7 and summed[str(LATENCY_BUCKETS[0])] == 1


def test_metrics_text_parses_with_escaped_labels_and_own_registry() -> None:
    """Every family parses; a model name with quotes and backslashes survives; the global registry is untouched."""
    name = 'we"ird\\model'
    m = ReplicaMetrics("r0", name, lambda: snapshot(3))
    m.requests.finished("stop", 5, 7)
    families = {f.name: f for f in text_string_to_metric_families(m.text().decode())}
    running = families["gridserve_num_requests_running"].samples[0]
    assert running.value == 3 and running.labels == {"model_name": name, "replica": "r0"}
    assert families["gridserve_num_preemptions"].type == "counter"
    assert families["gridserve_request_generation_tokens"].type == "histogram"
    assert families["gridserve_worker_busy_percent"].samples[0].labels["stage"] == "0"
    success = [s for s in families["gridserve_request_success"].samples if s.name.endswith("_total")]
    assert success[0].labels["finished_reason"] == "stop" and success[0].value == 1
    assert not any(n.startswith("gridserve_") for n in REGISTRY._names_to_collectors)
