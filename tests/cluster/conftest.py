"""Ray clusters for the cluster tests: loopback-only, logical GPUs, torn down by the fixture that made them."""
from __future__ import annotations

from typing import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray node with 4 logical GPUs (workers compute on the CPU, one actor per 'GPU')."""
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, _node_ip_address=LOOPBACK,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    """Two simulated Ray nodes with 2 logical GPUs each, bound to loopback."""
    import ray._private.services as services

    # Cluster derives the GCS address from the outward-facing interface; keep everything on loopback.
    original = services.node_ip_address_from_perspective
    services.node_ip_address_from_perspective = lambda address=None: LOOPBACK
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2,
                                                           "node_ip_address": LOOPBACK,
                                                           "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=2, node_ip_address=LOOPBACK)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    services.node_ip_address_from_perspective = original
