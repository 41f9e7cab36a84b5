"""Two replicas behind the prefix-aware router: a prompt sharing a prefix with an earlier one lands where that
prefix is cached, which the answer's `usage.prompt_tokens_details.cached_tokens` shows."""
from __future__ import annotations

import random
import time

import httpx
import pytest

from tests.serving import ONE_NODE, SharedServe

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)
BLOCK = 4
PREFIX = 40  # tokens shared by the "users" of one system prompt: 10 full blocks


@pytest.fixture(scope="module")
def two_routed_replicas(shared_serve: SharedServe, chat_model: str) -> str:
    """Two tp=1 replicas of the tiny model, prefix routing on (the default)."""
    return shared_serve.serve(ONE_NODE, {"gridserve": (
        {"model": chat_model, "served_model_name": "tiny", "cpus_per_worker": 0.5, "replica_cpus": 0.25,
         "max_model_len": 256, "max_num_batched_tokens": 256, "block_size": BLOCK},
        {"num_replicas": 2, "health_check_period_s": 1})})


def cached_tokens(url: str, prompt: list[int]) -> tuple[int, str]:
    """Prompt tokens the answering replica's prefix cache served, and the answer's engine header (for messages)."""
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2,
                                                  "temperature": 0}, timeout=120)
    r.raise_for_status()
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], r.headers.get("x-gridserve-engine-ms", "")


@pytest.mark.timeout(600)
def test_requests_sharing_a_prefix_follow_it(two_routed_replicas: str) -> None:
    """4 system prompts x 4 users in random order: every user after a prompt's first finds its whole prefix
    cached. Under random routing each of those 12 would miss with probability 1/2."""
    rng = random.Random(0)
    systems = [[rng.randrange(1, 200) for _ in range(PREFIX)] for _ in range(4)]
    order = [(s, u) for s in range(4) for u in range(4)]
    rng.shuffle(order)
    seen: set[int] = set()
    for s, u in order:
        prompt = systems[s] + [200 + u, 201 + u, 202 + u]
        hit, _ = cached_tokens(two_routed_replicas, prompt)
        if s in seen:
            assert hit >= PREFIX, f"system prompt {s}, user {u}: {hit} cached tokens, the prefix has {PREFIX}"
        else:
            assert hit == 0
        seen.add(s)


def test_status_reaches_both_replicas(two_routed_replicas: str) -> None:
    """Calls without a prompt (here /status) are spread by the power-of-two fallback over both replicas."""
    seen = {httpx.get(f"{two_routed_replicas}/status", timeout=30).json()["replica"] for _ in range(40)}
    assert len(seen) == 2


def test_metrics_cover_both_replicas_on_every_scrape(two_routed_replicas: str) -> None:
    """/metrics merges every replica's series (whichever ingress answers): once both have posted, every scrape
    shows both, each family once, and the finished-request counters add up to at least what was sent here."""
    from prometheus_client.parser import text_string_to_metric_families

    for i in range(6):  # finished requests on both replicas (the router spreads prompts no one caches)
        cached_tokens(two_routed_replicas, [300 + i] * 8)

    def scrape() -> tuple[set[str], float, list[str]]:
        text = httpx.get(f"{two_routed_replicas}/metrics", timeout=30).text
        families = list(text_string_to_metric_families(text))
        ok = [s for f in families if f.name == "gridserve_request_success" for s in f.samples
              if s.name.endswith("_total")]
        return {s.labels["replica"] for s in ok}, sum(s.value for s in ok), [f.name for f in families]

    deadline = time.monotonic() + 60
    while (len(scrape()[0]) < 2 or scrape()[1] < 6) and time.monotonic() < deadline:
        time.sleep(1)  # replicas post at each health check (every second here)
    for _ in range(5):
        replicas, finished, names = scrape()
        assert len(replicas) == 2 and finished >= 6 and len(names) == len(set(names)), (replicas, finished)
