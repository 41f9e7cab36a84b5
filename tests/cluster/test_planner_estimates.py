"""The planner's per-rank estimates equal what real workers report after loading their shards."""
from __future__ import annotations

import pytest

from actors.shard.spec import ModelSpec
from cluster.planner import rank_kv_bytes, rank_weight_bytes
from tests.ray_grid import make_grid

pytestmark = pytest.mark.slow  # a Ray cluster per module


@pytest.mark.parametrize("variant,tp,pp", [("qwen2_bias", 2, 2), ("llama_tied_mqa", 2, 1), ("llama_gqa", 1, 2)])
def test_weight_and_kv_estimates_match_workers(local_ray: None, model_dirs: dict, variant: str, tp: int,
                                               pp: int) -> None:
    """Weights (biases, tied heads, padded vocab, replicated KV heads) and KV bytes per block, exactly."""
    spec = ModelSpec.from_dir(model_dirs[variant])
    grid = make_grid(str(model_dirs[variant]), tp, pp)
    try:
        for w, report in zip(grid.where, grid.reports):
            assert report["weight_bytes"] == rank_weight_bytes(spec, tp, pp, w["pp_rank"], 4), w
            assert report["block_bytes"] == rank_kv_bytes(spec, tp, pp, w["pp_rank"], grid.cfg.block_size, 4), w
    finally:
        grid.shutdown()
