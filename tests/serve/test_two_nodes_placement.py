"""The Serve path on a simulated 2-node cluster: a tp=2 x pp=2 replica keeps each TP group on one node."""
from __future__ import annotations

import httpx
import pytest

from tests.serving import TWO_NODES, SharedServe

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)


@pytest.fixture(scope="module")
def url(shared_serve: SharedServe, chat_model: str) -> str:
    """Serve on the two nodes (2 logical GPUs each); one tp=2 pp=2 replica needs all four."""
    return shared_serve.serve(TWO_NODES, {"gridserve": (
        {"model": chat_model, "served_model_name": "tiny", "tensor_parallel_size": 2, "pipeline_parallel_size": 2,
         "replica_cpus": 0.5, "max_model_len": 128, "max_num_batched_tokens": 256, "block_size": 4,
         "kv_cache_memory_bytes": 2**20}, {})})


@pytest.mark.timeout(600)
def test_tp_groups_share_a_node_and_stages_spread(url: str) -> None:
    """/status: each stage's two workers on one node, the stages on different nodes; a completion works."""
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4},
                   timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    workers = httpx.get(f"{url}/status", timeout=60).json()["workers"]
    node = {(w["pp_rank"], w["tp_rank"]): w["node_id"] for w in workers}
    assert len(node) == 4 and all(w["device"] == "cpu" for w in workers)
    assert node[(0, 0)] == node[(0, 1)] and node[(1, 0)] == node[(1, 1)] and node[(0, 0)] != node[(1, 0)]


@pytest.mark.timeout(120)
def test_ingress_and_response_store_run_on_the_head(url: str) -> None:
    """ingress_on_head (default): the ingress replica and the stored-responses actor are on the head node, so losing
    the other node cannot take client connections with it."""
    import ray
    from ray._private.state import actors  # the GCS's table (the test cluster runs no dashboard for ray.util.state)

    r = httpx.post(f"{url}/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text  # stores the response, so the store's actor exists
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    where = {a["ActorClassName"].split(":")[-1]: a["Address"]["NodeID"] for a in actors().values()
             if a["State"] == "ALIVE" and a["ActorClassName"].split(":")[-1] in ("OpenAIIngress", "ResponseStore")}
    assert where == {"OpenAIIngress": head, "ResponseStore": head}, (head, where)
