"""Placement on a simulated 2-node cluster (2 logical GPUs per node)."""
from __future__ import annotations

import pytest
from ray.cluster_utils import Cluster

from tests.ray_grid import make_grid
from tests.reference import PROMPTS, grid_greedy, hf_greedy
from tests.waits import wait_until

pytestmark = pytest.mark.slow  # a Ray cluster per module


def test_stages_on_different_nodes_tp_groups_packed(two_nodes: Cluster, model_dirs: dict) -> None:
    """tp=2, pp=2: each stage's TP group shares a node, the two stages sit on different nodes."""
    grid = make_grid(str(model_dirs["llama_gqa"]), 2, 2)
    try:
        nodes = {(w["pp_rank"], w["tp_rank"]): w["node_id"] for w in grid.layout_table()}
        assert nodes[(0, 0)] == nodes[(0, 1)]
        assert nodes[(1, 0)] == nodes[(1, 1)]
        assert nodes[(0, 0)] != nodes[(1, 0)]
        assert grid.channel is None  # 'auto': a stage off the driver's node means Ray calls carry the steps
        ref = [hf_greedy(model_dirs["llama_gqa"], p, 6)[0] for p in PROMPTS]
        assert grid_greedy(grid, PROMPTS, 6, block_size=4) == ref
    finally:
        grid.shutdown()


def test_socket_channel_across_nodes_is_refused(two_nodes: Cluster, model_dirs: dict) -> None:
    """step_channel='socket' with a stage on another node than the driver: a ValueError naming the fix (tp=2 fills
    a node, so the two stages cannot share one)."""
    with pytest.raises(ValueError, match=r"step_channel='socket' cannot be used: workers run on other nodes"):
        make_grid(str(model_dirs["llama_gqa"]), 2, 2, step_channel="socket").shutdown()  # (shut down if it fits)


def test_tp_wider_than_a_node_is_refused(two_nodes: Cluster, model_dirs: dict) -> None:
    """tp=4 on 2-GPU nodes: refused up front, pointing at pipeline parallelism or the explicit opt-in."""
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 needs 4 GPU on one node.*largest node has 2"):
        make_grid(str(model_dirs["llama_gqa"]), 4, 1)


@pytest.mark.timeout(60)
def test_grid_larger_than_cluster_fails_fast(two_nodes: Cluster, model_dirs: dict, tmp_path) -> None:
    """5 workers on a 4-GPU cluster: an error naming the shortfall before any placement group is reserved."""
    import ray

    from deployments.make_model import write_model

    d = write_model(tmp_path / "m5", hidden_size=40, intermediate_size=80, num_hidden_layers=5,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64, tokenizer=False)
    # An earlier test's placement group is removed asynchronously: start from a free cluster.
    wait_until(lambda: ray.available_resources().get("GPU") == 4, 30, "the earlier tests' GPUs to be released")
    with pytest.raises(ValueError, match=r"needs 5 GPU .* cluster has 4 GPU in total"):
        make_grid(str(d), 1, 5)
    assert ray.available_resources().get("GPU") == 4  # nothing reserved, nothing left pending
