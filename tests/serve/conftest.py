"""A real Serve app on a free loopback port, shared by the HTTP tests of a module."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import pytest

from tests.loopback import LOOPBACK, free_port, loopback_cluster


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small Llama (256 positions) whose vocabulary is its tokenizer's, so any text prompt is in range."""
    from deployments.make_model import write_model

    return str(write_model(tmp_path_factory.mktemp("chat") / "tiny", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, seed=3,
                           max_position_embeddings=256))


@contextmanager
def serve_on_loopback() -> Iterator[str]:
    """Serve's HTTP proxy on a free loopback port of the connected Ray; yields the base URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port})
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        serve.shutdown()


def deploy(args: dict, **deployment_options: Any) -> None:
    """Deploy the gridserve app with `args`; returns once its replicas run."""
    from ray import serve

    from cluster.config import GridServeConfig
    from deployments.serve_app import make_app

    serve.run(make_app(GridServeConfig(**args), **deployment_options), name="gridserve", route_prefix="/")


@contextmanager
def serving(args: dict, metrics_port: int | None = None, **deployment_options: Any) -> Iterator[str]:
    """A local loopback Ray (Ray's metrics exporter on `metrics_port` if given) serving the app; the base URL."""
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    with loopback_cluster({"num_cpus": 4, **extra}), serve_on_loopback() as url:
        deploy(args, **deployment_options)
        yield url


@pytest.fixture(scope="module")
def server(chat_model: str) -> Iterator[str]:
    """Serve the tiny Llama with tp=2, pp=2 on CPU bundles; yields the base URL."""
    # No max_model_len: the model's own 256 positions, as a user who sets none gets.
    with serving({"model": chat_model, "served_model_name": "tiny", "tensor_parallel_size": 2,
                  "pipeline_parallel_size": 2, "cpus_per_worker": 0.5, "replica_cpus": 0.5,
                  "max_num_batched_tokens": 256, "block_size": 4, "kv_cache_memory_bytes": 2**20}) as url:
        httpx.get(f"{url}/health", timeout=30).raise_for_status()
        yield url
