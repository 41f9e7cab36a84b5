"""API key on every route but /health, a bounded queue (503 + Retry-After), and client disconnects that abort;
both with the model replica behind a handle and colocated in the ingress."""
from __future__ import annotations

import threading

import httpx
import pytest

from tests.serving import ONE_NODE, SharedServe
from tests.waits import wait_until

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)
KEY = {"Authorization": "Bearer s3cret"}
LAYOUTS = {"split": False, "colocated": True}  # application name -> colocate_ingress


@pytest.fixture(scope="module")
def both_layouts(shared_serve: SharedServe, chat_model: str) -> str:
    """Serve running the app twice, tp=1 pp=1 with an API key, 2 running and 2 waiting sequences at most:
    colocate_ingress off as application 'split', on as 'colocated' (each under its name)."""
    return shared_serve.serve(ONE_NODE, {name: (
        {"model": chat_model, "served_model_name": "tiny", "cpus_per_worker": 1, "replica_cpus": 0.5,
         "max_model_len": 256, "max_num_batched_tokens": 256, "max_num_seqs": 2, "max_waiting_requests": 2,
         "api_key": "s3cret", "colocate_ingress": colocated}, {}) for name, colocated in LAYOUTS.items()})


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> str:
    """The application under test: 'split' (OpenAIIngress -> LLMServer) or 'colocated' (one deployment)."""
    return request.param


@pytest.fixture
def guarded(both_layouts: str, layout: str) -> str:
    """The base URL of that application."""
    return f"{both_layouts}/{layout}"


def test_colocated_ingress_is_the_only_deployment(guarded: str, layout: str) -> None:
    """colocate_ingress runs one deployment (the model inside the ingress); off, the ingress calls LLMServer."""
    from ray import serve

    assert httpx.get(f"{guarded}/health", timeout=30).status_code == 200
    deployments = set(serve.status().applications[layout].deployments)
    assert deployments == ({"OpenAIIngress"} if LAYOUTS[layout] else {"OpenAIIngress", "LLMServer"})


def test_api_key_on_every_route_but_health(guarded: str) -> None:
    """No key or a wrong key is 401 with an OpenAI error body; /health stays open."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/status"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = httpx.request(method, f"{guarded}{path}", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
    assert httpx.get(f"{guarded}/health", timeout=30).status_code == 200
    assert httpx.post(f"{guarded}/v1/completions", json=body, headers=KEY, timeout=60).status_code == 200


def test_full_queue_answers_503_with_retry_after(guarded: str) -> None:
    """12 long requests at once against 2 running + 2 waiting: the rest get 503 + Retry-After, none hang."""
    statuses: list[tuple[int, str | None]] = []

    def one() -> None:
        r = httpx.post(f"{guarded}/v1/completions", headers=KEY, timeout=120,
                       json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 60, "ignore_eos": True})
        statuses.append((r.status_code, r.headers.get("retry-after")))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(code for code, _ in statuses)
    assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
    assert all(retry == "1" for code, retry in statuses if code == 503)


def test_client_disconnect_aborts_the_request(guarded: str) -> None:
    """Closing a stream early frees its sequence: nothing keeps running on the replica."""
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True}
    before = httpx.get(f"{guarded}/status", headers=KEY, timeout=30).json()["engine"]["generation_tokens_total"]
    with httpx.stream("POST", f"{guarded}/v1/completions", json=body, headers=KEY, timeout=60) as r:
        for n, _line in enumerate(r.iter_lines()):
            if n >= 4:
                break  # leaving the block closes the connection mid-stream

    def idle() -> dict | None:
        engine = httpx.get(f"{guarded}/status", headers=KEY, timeout=30).json()["engine"]
        return engine if engine["requests_running"] == 0 and engine["requests_waiting"] == 0 else None

    engine = wait_until(idle, 60, "the aborted request to leave the engine")
    assert engine["kv_cache_usage"] == 0
    assert engine["generation_tokens_total"] - before < 100  # stopped early, not run to its 200 tokens
