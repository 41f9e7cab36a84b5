"""Fault injection on a real Serve app: a worker process killed mid-stream; the replica heals itself and the
stream migrates to the rebuilt grid."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import ONE_NODE, SharedServe
from tests.waits import wait_until

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)


@pytest.fixture(scope="module")
def ray_metrics_port(shared_serve: SharedServe) -> int:
    """Where Ray's own Prometheus exporter listens on the package's one-node cluster."""
    return shared_serve.metrics_port


@pytest.fixture(scope="module")
def faulty_server(shared_serve: SharedServe, chat_model: str) -> str:
    """tp=2 pp=2 on CPU bundles, a short step timeout; the base URL."""
    return shared_serve.serve(ONE_NODE, {"gridserve": (
        {"model": chat_model, "served_model_name": "tiny", "tensor_parallel_size": 2, "pipeline_parallel_size": 2,
         "cpus_per_worker": 0.5, "replica_cpus": 0.5, "max_model_len": 256, "max_num_batched_tokens": 256,
         "block_size": 8, "kv_cache_memory_bytes": 2**21, "step_timeout_s": 20, "migration_timeout_s": 170}, {})})


def test_status_shows_the_grid(faulty_server: str, ray_metrics_port: int, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    """/status lists 2 x 2 workers with memory and utilization after some steps; /metrics parses as Prometheus
    text with the latency histograms and worker gauges; Ray's exporter carries the gauges; `gridserve status`
    prints the grid and draws it."""
    from deployments.status import main as status_main

    httpx.post(f"{faulty_server}/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 8},
               timeout=60).raise_for_status()
    st = httpx.get(f"{faulty_server}/status", timeout=30).json()
    assert sorted((w["pp_rank"], w["tp_rank"]) for w in st["workers"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(w["weight_bytes"] > 0 and w["kv_bytes"] > 0 and w["host_rss_bytes"] > 0 for w in st["workers"])
    assert all(w["steps"] >= 8 and 0 < w["busy_pct"] <= 100 for w in st["workers"])
    assert all((w["handoff_ms"] > 0) == (w["pp_rank"] == 1) for w in st["workers"])  # stage 1 times its input
    assert st["mailbox_connections"] == 1  # the answer came back through the ingress's mailbox, not the call
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{faulty_server}/metrics",
                                                                             timeout=30).text)}
    for name in ("gridserve_time_to_first_token_seconds", "gridserve_e2e_request_latency_seconds",
                 "gridserve_request_queue_time_seconds"):
        count = next(s.value for s in families[name].samples if s.name == f"{name}_count")
        assert families[name].type == "histogram" and count >= 1, name
    itl = next(s.value for s in families["gridserve_inter_token_latency_seconds"].samples if s.name.endswith("_count"))
    assert itl >= 7  # 8 tokens: 7 gaps
    busy = {(s.labels["stage"], s.labels["tp_rank"]) for s in families["gridserve_worker_busy_percent"].samples}
    assert busy == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}

    def ray_exported() -> str:  # Serve's health check (every 10 s) refreshes Ray's gauges
        text = httpx.get(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=10).text
        return text if "ray_gridserve_worker_busy_percent{" in text else ""

    assert "ray_gridserve_num_requests_running{" in wait_until(ray_exported, 90, "Ray's exporter to show the gauges")
    assert status_main(["--url", faulty_server, "--samples", "2", "--png", str(tmp_path / "grid.png")]) == 0
    printed = capsys.readouterr().out
    # one "cpu" device per worker row, as a word: the replica's random id may hold the letters too (a CI run: w8zxcpuf)
    assert "tp=2 pp=2" in printed and len(re.findall(r"\bcpu\b", printed)) == 4
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert "prefix-cache hits" in printed


@pytest.mark.timeout(300)
def test_killed_worker_stream_migrates_to_the_rebuilt_grid(faulty_server: str) -> None:
    """SIGKILL a stage-1 worker mid-stream: the stream goes on after the grid is rebuilt, with no error, no token
    repeated or missing (its text equals an undisturbed greedy run's); requests meanwhile get 503 + Retry-After;
    then the rebuilt grid serves."""
    victim = next(w for w in httpx.get(f"{faulty_server}/status", timeout=30).json()["workers"]
                  if (w["pp_rank"], w["tp_rank"]) == (1, 1))
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    calm = httpx.post(f"{faulty_server}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    events: list[dict] = []
    with httpx.stream("POST", f"{faulty_server}/v1/completions", json={**body, "stream": True}, timeout=240) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    break
        os.kill(victim["pid"], signal.SIGKILL)  # a worker process of the cluster this test started
        for line in lines:
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    assert all("error" not in e for e in events), events[-1]
    assert "".join(e["choices"][0]["text"] for e in events) == calm
    assert events[-1]["choices"][0]["finish_reason"] == "length"

    def served() -> bool:
        r = httpx.post(f"{faulty_server}/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200 or (r.status_code == 503 and r.json()["error"]["type"] == "server_error"
                                        and r.headers["Retry-After"] == "5"), r.text
        return r.status_code == 200

    wait_until(served, 180, "the replica to serve again after its worker died", poll_s=1)
    st = httpx.get(f"{faulty_server}/status", timeout=30).json()
    assert st["rebuilds"] == 1 and victim["pid"] not in {w["pid"] for w in st["workers"]}
