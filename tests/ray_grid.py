"""A Ray grid of logical-GPU workers for a small test model, on the cluster a test fixture started."""
from __future__ import annotations

from cluster.config import GridServeConfig
from cluster.grid import WorkerGrid
from cluster.placement import create_replica_group


def make_grid(model_dir: str, tp: int, pp: int, **extra: object) -> WorkerGrid:
    """A tp x pp WorkerGrid (256 positions, blocks of 4, 1 MiB of KV cache per worker); `extra`: more config."""
    cfg = GridServeConfig(model=model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, max_model_len=256,
                          max_num_batched_tokens=256, block_size=4, kv_cache_memory_bytes=2**20, **extra)
    return WorkerGrid(cfg, create_replica_group(cfg)[0], owns_group=True)
