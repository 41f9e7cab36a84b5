"""Two replicas under load, one killed: its requests get errors (never silence), the other keeps serving."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Iterator

import httpx
import pytest
from ray import serve

from tests.serve.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def two_replicas(chat_model: str) -> Iterator[str]:
    """Two tp=1 replicas of the tiny model."""
    yield start_server({"model": chat_model, "served_model_name": "tiny", "cpus_per_worker": 0.5,
                        "replica_cpus": 0.25, "max_model_len": 256, "max_num_batched_tokens": 256},
                       num_replicas=2)
    stop_server()


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
    time.sleep(4)
    before_kill = len(outcomes)
    os.kill(next(iter(pids.values())), signal.SIGKILL)  # a replica process of the cluster this test started
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert "timeout" not in outcomes and before_kill > 0
    assert all(o == "ok" or o.startswith(("http 5", "transport")) for o in outcomes), set(outcomes)
    assert outcomes[before_kill:].count("ok") > 0  # the surviving replica kept serving
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and running_replicas() < 2:
        time.sleep(1)
    assert running_replicas() == 2, "Serve did not replace the killed replica"
    r = httpx.post(f"{two_replicas}/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
