"""gridserve side of `bench.peer`: one grid, every offline workload, one JSON line.

Run with PYTHONPATH=<a gridserve checkout> so the same script times that checkout (this one, or a previous version
in another worktree): it only uses WorkerGrid, AsyncEngine and GridServeConfig.

python bench/peer_grid.py '{"model": DIR, "tp": 1, "quick": false}'
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run as a script, this file's folder leads sys.path, and its siblings (kernels.py, engine.py, ...) would shadow
# packages of the same name; drop it and load the shared workloads module by path instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("peer_workloads", HERE / "peer_workloads.py")
peer_workloads = sys.modules["peer_workloads"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_workloads)
make_prompts, vocab_size, workloads = peer_workloads.make_prompts, peer_workloads.vocab_size, peer_workloads.workloads

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # this Ray stays on 127.0.0.1 (set before import)
CORES = os.cpu_count() or 1


def main() -> None:
    """Start one grid, warm it up, time every workload at each of its output lengths, print the result."""
    import ray

    from actors.shard.sampler import SamplingParams
    from cluster.config import GridServeConfig
    from cluster.engine import AsyncEngine
    from cluster.grid import WorkerGrid
    from cluster.placement import create_replica_group

    args = json.loads(sys.argv[1])
    tp = args["tp"]
    ray.init(address="local", num_cpus=max(CORES, 4), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    cfg = GridServeConfig(model=args["model"], tensor_parallel_size=tp, resource="CPU", cpus_per_worker=CORES / tp,
                          max_model_len=512, max_num_seqs=64, max_num_batched_tokens=2048,
                          kv_cache_memory_bytes=512 * 2**20)
    grid = WorkerGrid(cfg, create_replica_group(cfg)[0], owns_group=True)
    vocab, greedy = vocab_size(args["model"]), SamplingParams(temperature=0.0)

    async def run(prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        engine = AsyncEngine(grid, cfg.block_size, len(prompts), cfg.max_num_batched_tokens, cfg.max_model_len)

        async def one(p: list[int]) -> list[int]:
            out = []
            async for ev in engine.generate(p, greedy, new, ignore_eos=True):
                if ev.error:
                    raise RuntimeError(ev.error)
                out.append(ev.token_id)
            return out

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
        assert all(len(t) == new for t in tokens), "gridserve stopped early"
        if engine._task is not None:
            engine._task.cancel()  # the engine's idle step loop
        return wall, list(tokens)

    async def all_workloads() -> list[dict]:
        await run(make_prompts(4, 32, vocab, 999), 8)  # warm-up
        results = []
        for salt, w in enumerate(workloads(args["quick"])):
            walls, first = [], None
            await run(make_prompts(w.streams, 16, vocab, 500 + salt), 4)  # warm-up at this batch size
            for k, new in enumerate(w.new):
                best = float("inf")
                for rep in range(args.get("repeats", 1)):  # the fastest of a few: contention from other work only adds
                    wall, tokens = await run(make_prompts(w.streams, w.prompt, vocab, 100 * salt + 10 * k + rep), new)
                    best = min(best, wall)
                    first = first or tokens[0]
                walls.append(best)
            results.append({"workload": w.name, "walls": walls, "tokens_per_s": w.rate(walls),
                            "first_tokens": first})
        return results

    try:
        results = asyncio.run(all_workloads())
    finally:
        grid.shutdown()
        ray.shutdown()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
