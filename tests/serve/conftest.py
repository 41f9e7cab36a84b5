"""A real Serve app on a free loopback port, shared by the HTTP tests of a module."""
from __future__ import annotations

import socket
from typing import Iterator

import httpx
import pytest
import ray
from ray import serve


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small Llama (256 positions) whose vocabulary is its tokenizer's, so any text prompt is in range."""
    from deployments.make_model import write_model

    return str(write_model(tmp_path_factory.mktemp("chat") / "tiny", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, seed=3,
                           max_position_embeddings=256))


def start_server(args: dict, metrics_port: int | None = None, **deployment_options: object) -> str:
    """Start local Ray (Ray's metrics exporter on `metrics_port` if given) and Serve on a free loopback port,
    deploy the app with `args`; returns the base URL."""
    from cluster.config import GridServeConfig
    from deployments.serve_app import make_app

    port = free_port()
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", **extra)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = make_app(GridServeConfig(**args), **deployment_options)
    serve.run(app, name="gridserve", route_prefix="/")  # returns once the replicas are running
    return f"http://127.0.0.1:{port}"


def stop_server() -> None:
    """Tear down what start_server started."""
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def server(chat_model: str) -> Iterator[str]:
    """Serve the tiny Llama with tp=2, pp=2 on CPU bundles; yields the base URL."""
    url = start_server({"model": chat_model, "served_model_name": "tiny", "tensor_parallel_size": 2,
                        "pipeline_parallel_size": 2, "cpus_per_worker": 0.5, "replica_cpus": 0.5,
                        "max_num_batched_tokens": 256, "block_size": 4,  # max_model_len: the model's 256
                        "kv_cache_memory_bytes": 2**20})
    httpx.get(f"{url}/health", timeout=30).raise_for_status()
    yield url
    stop_server()
