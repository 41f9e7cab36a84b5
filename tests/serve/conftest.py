"""Serve apps on a loopback Ray kept for the whole package (tests.serving.SharedServe): each module asks for its
nodes and apps; modules asking for the same ones share them."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.serving import ONE_NODE, SharedServe


@pytest.fixture(scope="package")
def shared_serve() -> Iterator[SharedServe]:
    """The package's Serve, started by the first module that asks; shut down after the package's last test."""
    shared = SharedServe()
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small Llama (256 positions) whose vocabulary is its tokenizer's, so any text prompt is in range."""
    from deployments.make_model import write_model

    return str(write_model(tmp_path_factory.mktemp("chat") / "tiny", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, seed=3,
                           max_position_embeddings=256))


@pytest.fixture(scope="module")
def server(shared_serve: SharedServe, chat_model: str) -> str:
    """The tiny Llama with tp=2, pp=2 on CPU bundles (shared by the modules that only send it requests); the base
    URL."""
    # No max_model_len: the model's own 256 positions, as a user who sets none gets.
    url = shared_serve.serve(ONE_NODE, {"gridserve": (
        {"model": chat_model, "served_model_name": "tiny", "tensor_parallel_size": 2, "pipeline_parallel_size": 2,
         "cpus_per_worker": 0.5, "replica_cpus": 0.5, "max_num_batched_tokens": 256, "block_size": 4,
         "kv_cache_memory_bytes": 2**20}, {})})
    httpx.get(f"{url}/health", timeout=30).raise_for_status()
    return url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    """The official client pointed at a module's `url` replica (modules that serve one define `url`)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
