"""The CUDA/NCCL path: a grid on real GPUs generates HF's greedy tokens (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.slow]  # a Ray cluster in the test


def test_cuda_grid_bf16_matches_hf_greedy(model_dirs: dict) -> None:
    """tp=1 on one GPU in bfloat16: the first greedy tokens equal HF's on the same GPU and dtype."""
    import transformers

    from cluster.config import GridServeConfig
    from cluster.grid import WorkerGrid
    from cluster.placement import create_replica_group
    from tests.loopback import loopback_cluster
    from tests.reference import PROMPTS, grid_greedy

    d = model_dirs["llama_gqa"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None  # full length, like the grid's ignore_eos
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    with loopback_cluster({}):
        cfg = GridServeConfig(model=str(d), dtype="bfloat16", max_model_len=256, max_num_batched_tokens=256,
                              block_size=4)
        grid = WorkerGrid(cfg, create_replica_group(cfg)[0], owns_group=True)
        try:
            got = grid_greedy(grid, [PROMPTS[0]], 8, block_size=4)[0]
            assert grid.layout_table()[0]["device"].startswith("cuda")
        finally:
            grid.shutdown()
    assert got[:4] == ref.tolist()[:4]  # bf16 ties may split later tokens
