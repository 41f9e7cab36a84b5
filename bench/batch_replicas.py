"""Batch job data parallelism: the same 256 prompts over K=1 and K=2 tp=1 pp=1 grids, in one run.

python -m bench.batch_replicas [--prompts 256] [--max-tokens 32] [--max-num-seqs 32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import ray
import torch

from bench.common import BENCH_MODEL, ensure_model, model_info, prompts
from cluster.config import GridServeConfig
from deployments.batch import run


def main() -> None:
    """Run K=1 (all cores to one worker) then K=2 (half the cores each); print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    model = ensure_model(BENCH_MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": a.max_tokens, "temperature": 0,
                                       "ignore_eos": True}) + "\n" for p in prompts(a.prompts, 32, model)))
    print(f"machine: {platform.machine()} {cores} cores, no GPU; torch {torch.__version__}, Ray {ray.__version__}; "
          f"model {model_info(model)}; {a.prompts} prompts x (32 + {a.max_tokens} new tokens), greedy")
    ray.init(address="local", num_cpus=cores + 1, include_dashboard=False, _node_ip_address="127.0.0.1")
    rows, outputs = [], {}
    try:
        for k in (1, 2):
            cfg = GridServeConfig(model=model, cpus_per_worker=cores / k, max_model_len=256,
                                  max_num_seqs=a.max_num_seqs, kv_cache_memory_bytes=256 * 2**20)
            dst = tmp / f"out{k}.jsonl"
            s = run(cfg, src, dst, replicas=k)
            outputs[k] = [json.loads(x)["token_ids"] for x in dst.read_text().splitlines()]
            rows.append((k, cores / k, s.completion_tokens / s.wall_s, s.wall_s, s.per_grid, s.failed))
    finally:
        ray.shutdown()
    base = rows[0][2]
    print("\n| grids (K) | CPUs per worker | tokens/s | wall s | vs K=1 | requests per grid | failed |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for k, cpus, rate, wall, per_grid, failed in rows:
        print(f"| {k} | {cpus:g} | {rate:.1f} | {wall:.1f} | {rate / base:.2f} | {per_grid} | {failed} |")
    print(f"same tokens from K=1 and K=2: {outputs[1] == outputs[2]}")


if __name__ == "__main__":
    main()
