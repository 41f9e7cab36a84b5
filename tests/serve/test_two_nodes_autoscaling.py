"""Autoscaling on a simulated 2-node cluster: load scales 1 -> 2 grids, quiet scales back, no request fails."""
from __future__ import annotations

import threading

import httpx
import pytest
from ray import serve

from tests.serving import TWO_NODES, SharedServe
from tests.waits import wait_until

pytestmark = pytest.mark.slow  # an app scaled out and back on two simulated nodes (the package's shared Ray)


@pytest.fixture(scope="module")
def cluster_url(shared_serve: SharedServe, chat_model: str) -> tuple[str, str]:
    """Two loopback nodes with 2 logical GPUs each, Serve running no app yet; (its URL, the model)."""
    return shared_serve.serve(TWO_NODES, {}), chat_model


def replicas() -> list:
    """Running replicas of the LLMServer deployment."""
    status = serve.status().applications["gridserve"].deployments["LLMServer"]
    return [r for r in status.replica_states.items() if r[0] == "RUNNING" for _ in range(r[1])]


@pytest.mark.timeout(600)
def test_load_scales_out_to_a_second_grid_and_back(cluster_url: tuple[str, str]) -> None:
    """Sustained streams push pending tokens past the target: a second tp=2 grid starts; idle, it goes away."""
    from cluster.config import GridServeConfig
    from deployments.serve_app import make_app

    url, model = cluster_url
    cfg = GridServeConfig(model=model, served_model_name="tiny", tensor_parallel_size=2, max_model_len=256,
                          max_num_batched_tokens=256, block_size=8, kv_cache_memory_bytes=2**22, replica_cpus=0.5)
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1000, "upscale_delay_s": 1,
                   "downscale_delay_s": 4, "look_back_period_s": 2, "metrics_interval_s": 0.5,
                   "policy": {"policy_function": "deployments.autoscaling:TokenLoadPolicy",
                              "policy_kwargs": {"target_pending_tokens": 200, "target_kv_usage": 0.9}}}
    serve.run(make_app(cfg, autoscaling_config=autoscaling, max_ongoing_requests=64), name="gridserve",
              route_prefix="/")
    assert len(replicas()) == 1
    failures: list[str] = []
    done = threading.Event()
    served = [0]

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not done.is_set():
                r = http.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 60,
                                                            "ignore_eos": True})
                if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 60:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                served[0] += 1

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(replicas()) == 2, 180, "a second replica under load", poll_s=0.5)
        at_scale_out = served[0]
        # Keep the load on until requests have finished while both replicas ran.
        wait_until(lambda: served[0] >= at_scale_out + 12, 180, "12 more answers with two replicas")
    finally:
        done.set()
    for t in threads:
        t.join()
    wait_until(lambda: len(replicas()) == 1, 180, "scaling back to 1 replica when idle", poll_s=0.5)
    assert not failures and served[0] > 12
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
