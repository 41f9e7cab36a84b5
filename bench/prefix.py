"""Prefix caching: requests sharing one long system prompt, with the prefix cache on and off, same grid, same run.

python -m bench.prefix [--requests 32] [--shared 384] [--unique 32] [--new 32]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from typing import Any

import numpy as np
import ray
import torch

from bench.common import BENCH_MODEL, BUDGET, ensure_model, greedy, make_grid, model_info, prompts, table
from cluster.engine import AsyncEngine


async def run(grid: Any, reqs: list[list[int]], new: int, cache: bool,
              ) -> tuple[float, list[float], list[list[int]], AsyncEngine]:
    """All requests at once on a fresh engine; returns wall s, TTFT per request (s), tokens, the engine."""
    engine = AsyncEngine(grid, grid.cfg.block_size, len(reqs), BUDGET, grid.cfg.max_model_len, prefix_caching=cache)

    async def one(prompt: list[int]) -> tuple[float, list[int]]:
        start, first, ids = time.perf_counter(), None, []
        async for ev in engine.generate(prompt, greedy(), new, ignore_eos=True):
            first = first or time.perf_counter() - start
            ids.append(ev.token_id)
        return first, ids

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(p) for p in reqs))
    wall = time.perf_counter() - t0
    for task in asyncio.all_tasks() - {asyncio.current_task()}:
        task.cancel()  # the engine's idle step loop
    return wall, [o[0] for o in out], [o[1] for o in out], engine


def main() -> None:
    """One table: prefix cache off vs on, tokens/s, TTFT, prompt tokens prefilled, hit rate, same tokens."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--shared", type=int, default=384, help="tokens of the common system prompt")
    ap.add_argument("--unique", type=int, default=32, help="tokens of each request's own question")
    ap.add_argument("--new", type=int, default=32)
    a = ap.parse_args()
    model = ensure_model(BENCH_MODEL)
    system = prompts(1, a.shared, model)[0]
    reqs = [system + tail for tail in prompts(a.requests + 1, a.unique, model)[1:]]
    cores = os.cpu_count() or 1
    print(f"machine: {platform.machine()} {cores} cores, no GPU; torch {torch.__version__}, Ray {ray.__version__}; "
          f"model {model_info(model)}")
    ray.init(address="local", num_cpus=max(cores, 4), include_dashboard=False, _node_ip_address="127.0.0.1")
    grid = make_grid(model)
    try:
        asyncio.run(run(grid, reqs[:2], 4, False))  # warm-up
        results = {cache: asyncio.run(run(grid, reqs, a.new, cache)) for cache in (False, True)}
    finally:
        grid.shutdown()
        ray.shutdown()
    rows, base = [], results[False][0]
    for cache, (wall, ttft, _, engine) in results.items():
        sched = engine.scheduler
        rows.append(["on" if cache else "off", a.requests * a.new / wall, wall, base / wall,
                     1000 * float(np.median(ttft)), 1000 * float(np.percentile(ttft, 99)), engine.stats.prompt_tokens,
                     f"{100 * sched.prefix_hit_tokens / max(1, sched.admitted_tokens):.0f}%"])
    same = results[False][2] == results[True][2]
    table(f"prefix caching: {a.requests} requests x (shared {a.shared} + own {a.unique} prompt tokens, {a.new} new), "
          f"tp=1 pp=1, {model_info(model)}",
          ["prefix cache", "tokens/s", "wall s", "speed-up", "TTFT p50 ms", "TTFT p99 ms", "prompt tokens prefilled",
           "hit rate"], rows,
          [f"All requests submitted at once to a fresh engine (empty cache), greedy; prefill chunk {BUDGET} tokens.",
           f"Greedy tokens identical with the cache on and off: {'yes' if same else 'NO'}."])
    if not same:
        raise SystemExit("prefix caching changed the greedy tokens")


if __name__ == "__main__":
    main()
