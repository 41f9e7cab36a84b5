"""Two replicas under load, one killed: its requests continue on the other one (streams too, no token repeated or
missing), so clients see no error; Serve replaces the dead one."""
from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest
from ray import serve

from tests.serving import ONE_NODE, SharedServe
from tests.waits import wait_until

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)


@pytest.fixture(scope="module")
def two_replicas(shared_serve: SharedServe, chat_model: str) -> str:
    """Two tp=1 replicas of the tiny model."""
    return shared_serve.serve(ONE_NODE, {"gridserve": (
        {"model": chat_model, "served_model_name": "tiny", "cpus_per_worker": 0.5, "replica_cpus": 0.25,
         "max_model_len": 256, "max_num_batched_tokens": 256}, {"num_replicas": 2})})


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
def test_killing_one_replica_loses_nothing_and_shows_no_error(two_replicas: str) -> None:
    """Every request, streamed or not, ends with the same greedy text an undisturbed run gives; none fails."""
    pids = replica_pids(two_replicas)
    assert len(pids) == 2
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 30, "ignore_eos": True, "temperature": 0}
    calm = httpx.post(f"{two_replicas}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    outcomes: list[str] = []
    stop = threading.Event()

    def ask(http: httpx.Client, stream: bool) -> str:
        """One request's outcome: ok, or what went wrong."""
        if not stream:
            r = http.post(f"{two_replicas}/v1/completions", json=body)
            return "ok" if r.status_code == 200 and r.json()["choices"][0]["text"] == calm else f"http {r.status_code}"
        with http.stream("POST", f"{two_replicas}/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return f"http {r.status_code}"
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        if any("error" in e for e in events):
            return "stream error"
        return "ok" if "".join(e["choices"][0]["text"] for e in events) == calm else "stream text differs"

    def user(stream: bool) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    outcomes.append(ask(http, stream))
                except httpx.TimeoutException:
                    outcomes.append("timeout")
                except httpx.TransportError as exc:
                    outcomes.append(f"transport {type(exc).__name__}")

    threads = [threading.Thread(target=user, args=(i % 2 == 0,)) for i in range(8)]
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
    assert before_kill > 0 and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"]
    wait_until(lambda: running_replicas() == 2, 180, "Serve to replace the killed replica", poll_s=1)
    r = httpx.post(f"{two_replicas}/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
