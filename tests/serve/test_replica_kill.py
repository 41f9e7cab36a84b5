"""Two replicas under load, one killed: its requests continue on the other one (streams too, no token repeated or
missing), so clients see no error; Serve replaces the dead one. One replica's model worker killed: the replica hands
its requests back and the ingress continues them elsewhere; colocated, the replica continues them on its rebuilt
grid. The Serve controller killed: nothing fails."""
from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from ray import serve

from tests.serving import ONE_NODE, SharedServe
from tests.waits import wait_until

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)
CONTROLLER = "SERVE_CONTROLLER_ACTOR"  # the Serve controller's actor name, in namespace "serve"


@pytest.fixture(scope="module")
def two_replicas(shared_serve: SharedServe, chat_model: str) -> str:
    """Two tp=1 replicas of the tiny model."""
    args = {"model": chat_model, "served_model_name": "tiny", "cpus_per_worker": 0.5, "replica_cpus": 0.25,
            "max_model_len": 256, "max_num_batched_tokens": 256}
    return shared_serve.serve(ONE_NODE, {"gridserve": (args, {"num_replicas": 2}),
                                         "colocated": ({**args, "colocate_ingress": True}, {})})


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


def refused(r: httpx.Response) -> str:
    """A non-200 answer as an outcome: 'http <status>', and 'rebuilding' for a 503 refusing a new request while the
    only replica rebuilds its grid (what a client is told to retry)."""
    rebuilding = r.status_code == 503 and "being rebuilt" in r.text and "Retry-After" in r.headers
    return f"http {r.status_code}" + (" rebuilding" if rebuilding else "")


class Load:
    """Eight clients (half streaming) sending one greedy completion back to back; the outcome of each answer."""

    def __init__(self, url: str) -> None:
        """Start the clients after one undisturbed answer (the text every answer must equal)."""
        self.url, self.stop = url, threading.Event()
        self.outcomes: list[str] = []
        self.body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 30, "ignore_eos": True, "temperature": 0}
        self.calm = httpx.post(f"{url}/v1/completions", json=self.body, timeout=60).json()["choices"][0]["text"]
        self.threads = [threading.Thread(target=self.user, args=(i % 2 == 0,)) for i in range(8)]
        for t in self.threads:
            t.start()

    def ask(self, http: httpx.Client, stream: bool) -> str:
        """One request's outcome: ok, or what went wrong."""
        if not stream:
            r = http.post(f"{self.url}/v1/completions", json=self.body)
            return "ok" if r.status_code == 200 and r.json()["choices"][0]["text"] == self.calm \
                else refused(r)
        with http.stream("POST", f"{self.url}/v1/completions", json={**self.body, "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                return refused(r)
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        if any("error" in e for e in events):
            return "stream error"
        return "ok" if "".join(e["choices"][0]["text"] for e in events) == self.calm else "stream text differs"

    def user(self, stream: bool) -> None:
        """One client until told to stop."""
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                try:
                    self.outcomes.append(self.ask(http, stream))
                except httpx.TimeoutException:
                    self.outcomes.append("timeout")
                except httpx.TransportError as exc:
                    self.outcomes.append(f"transport {type(exc).__name__}")

    def oks_since(self, index: int) -> int:
        """Answers that came back right after the first `index` outcomes."""
        return self.outcomes[index:].count("ok")

    def finish(self, allowed: frozenset[str] = frozenset({"ok"})) -> None:
        """Stop the clients; no request may hang and every answer must be right (or one of `allowed`)."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in self.threads), "a request hung"
        assert "ok" in self.outcomes and set(self.outcomes) <= allowed, [o for o in self.outcomes if o not in allowed]


def fault_under_load(url: str, fault: Callable[[], None], allowed: frozenset[str] = frozenset({"ok"})) -> None:
    """Eight clients on `url`; after 8 answers `fault()`; then 16 more answers; every outcome in `allowed`."""
    load = Load(url)
    try:
        wait_until(lambda: load.oks_since(0) >= 8, 120, "8 answers before the fault")
        before = len(load.outcomes)
        fault()
        wait_until(lambda: load.oks_since(before) >= 16, 180, "16 answers after the fault")
    finally:
        load.finish(allowed)


@pytest.mark.timeout(600)
def test_killing_one_replica_loses_nothing_and_shows_no_error(two_replicas: str) -> None:
    """Every request, streamed or not, ends with the same greedy text an undisturbed run gives; none fails."""
    pids = replica_pids(two_replicas)
    assert len(pids) == 2
    # a replica process of the cluster this test started
    fault_under_load(two_replicas, lambda: os.kill(next(iter(pids.values())), signal.SIGKILL))
    wait_until(lambda: running_replicas() == 2, 180, "Serve to replace the killed replica", poll_s=1)
    r = httpx.post(f"{two_replicas}/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 3}, timeout=60)
    assert r.status_code == 200


def continued_choices() -> int:
    """How many times an ingress logged a choice continuing on another replica (its worker's stderr, this session)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return sum(f.read_text(errors="replace").count("continues on another replica") for f in logs.glob("worker-*.err"))


@pytest.mark.timeout(600)
def test_a_killed_model_worker_hands_its_requests_to_the_ingress(two_replicas: str) -> None:
    """A replica whose grid fails does not keep its requests waiting for its rebuild: the ingress continues them
    (on the other replica, or this one rebuilt) from what they sent, and no client sees an error."""
    wait_until(lambda: running_replicas() == 2, 180, "both replicas running", poll_s=1)
    worker = httpx.get(f"{two_replicas}/status", timeout=30).json()["workers"][0]["pid"]
    continued = continued_choices()
    fault_under_load(two_replicas, lambda: os.kill(worker, signal.SIGKILL))  # a model worker this test's cluster ran
    assert continued_choices() > continued, "no request was handed back to the ingress"


@pytest.mark.timeout(600)
def test_killing_the_serve_controller_shows_no_error(two_replicas: str) -> None:
    """The Serve controller crashes under load: requests go on (the proxy and the handles keep their replicas), Ray
    restarts the controller, and it sees both replicas running again."""
    import ray

    wait_until(lambda: running_replicas() == 2, 180, "both replicas running", poll_s=1)
    # a crash: Ray restarts it
    fault_under_load(two_replicas, lambda: ray.kill(ray.get_actor(CONTROLLER, namespace="serve"), no_restart=False))
    wait_until(lambda: running_replicas() == 2, 180, "the restarted controller to see both replicas", poll_s=1)


@pytest.mark.timeout(600)
def test_a_colocated_replica_continues_its_requests_on_its_rebuilt_grid(two_replicas: str) -> None:
    """colocate_ingress: no ingress hop to hand requests to, so the replica keeps its requests for its own rebuild:
    none in flight fails; new ones meanwhile are refused with 503 + Retry-After (this app's only replica)."""
    url = f"{two_replicas}/colocated"
    worker = httpx.get(f"{url}/status", timeout=30).json()["workers"][0]["pid"]
    fault_under_load(url, lambda: os.kill(worker, signal.SIGKILL), frozenset({"ok", "http 503 rebuilding"}))
    assert httpx.get(f"{url}/status", timeout=30).json()["rebuilds"] >= 1
