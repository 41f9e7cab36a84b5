"""Two replicas under load, one killed: its requests get errors (never silence), the other keeps serving."""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest
from ray import serve

from tests.serving import serving
from tests.waits import wait_until

pytestmark = pytest.mark.slow  # a Ray cluster and a Serve start-up in the module's fixture


@pytest.fixture(scope="module")
def two_replicas(chat_model: str) -> Iterator[str]:
    """Two tp=1 replicas of the tiny model."""
    with serving({"model": chat_model, "served_model_name": "tiny", "cpus_per_worker": 0.5, "replica_cpus": 0.25,
                  "max_model_len": 256, "max_num_batched_tokens": 256}, num_replicas=2) as url:
        yield url


def replica_pids(url: str) -> dict[str, int]:
    """Replica tag -> process id, gathered from /status answers spread over the replicas."""
    seen: dict[str, int] = {}
    for _ in range(40):
        st = httpx.get(f"{url}/status", timeout=30).json()
        seen[st["replica"]] = st["pid"]
        if len(seen) == 2:
            break
    return seen


def running_replicas() -> int:
    """Replicas of the deployment that Serve reports RUNNING."""
    return serve.status().applications["gridserve"].deployments["LLMServer"].replica_states.get("RUNNING", 0)


@pytest.mark.timeout(600)
def test_killing_one_replica_loses_nothing_silently(two_replicas: str) -> None:
    """Every request ends with a full answer or an error status within the timeout; serving goes on."""
    pids = replica_pids(two_replicas)
    assert len(pids) == 2
    outcomes: list[str] = []
    stop = threading.Event()

    def user() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post(f"{two_replicas}/v1/completions", json={
                        "model": "tiny", "prompt": [5, 6, 7], "max_tokens": 30, "ignore_eos": True})
                except httpx.TimeoutException:
                    outcomes.append("timeout")
                    continue
                except httpx.TransportError as exc:
                    outcomes.append(f"transport {type(exc).__name__}")
                    continue
                ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 30
                outcomes.append("ok" if ok else f"http {r.status_code}")

    threads = [threading.Thread(target=user) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: outcomes.count("ok") >= 8, 120, "8 answers before the kill")
        before_kill = len(outcomes)
        os.kill(next(iter(pids.values())), signal.SIGKILL)  # a replica process of the cluster this test started
        wait_until(lambda: outcomes[before_kill:].count("ok") >= 16, 180, "16 answers after the kill")
    finally:
        stop.set()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert "timeout" not in outcomes and before_kill > 0
    assert all(o == "ok" or o.startswith(("http 5", "transport")) for o in outcomes), set(outcomes)
    wait_until(lambda: running_replicas() == 2, 180, "Serve to replace the killed replica", poll_s=1)
    r = httpx.post(f"{two_replicas}/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
