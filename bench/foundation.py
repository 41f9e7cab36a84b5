"""Decode tokens/s at batch 1: Hugging Face `generate` vs the gridserve grid at tp=1 and tp=2, same run.

python -m bench.foundation [--model DIR] [--new-tokens 64] [--prompt-len 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def hf_decode(model_dir: str, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, list[int]]:
    """Median decode tokens/s of HF generate (prefill excluded by subtracting a 1-token run)."""
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0)
    rates, tokens = [], []
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            t2 = time.perf_counter()
            rates.append((new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
            tokens = out[0, len(prompt):].tolist()
    return statistics.median(rates), tokens


def grid_decode(model_dir: str, tp: int, prompt: list[int], new_tokens: int, repeats: int,
                **overrides: object) -> tuple[float, list[int], float, float]:
    """Median decode tokens/s of a tp x 1 grid, the tokens, step ms and all-reduce share of step time."""
    from actors.shard.sampler import SamplingParams
    from cluster.blocks import BlockManager
    from cluster.config import GridServeConfig
    from cluster.grid import WorkerGrid
    from cluster.placement import create_replica_group
    from cluster.scheduler import Scheduler, Sequence

    # On CPU each worker gets an equal share of the cores (2 cores, tp=2: one thread each).
    cores = os.cpu_count() or 1
    cfg = GridServeConfig(model=model_dir, tensor_parallel_size=tp, resource="CPU", cpus_per_worker=max(1, cores // tp),
                          max_model_len=512, max_num_batched_tokens=512, kv_cache_memory_bytes=64 * 2**20,
                          **overrides)
    grid = WorkerGrid(cfg, create_replica_group(cfg)[0], owns_group=True)
    try:
        rates, tokens, steps, shares = [], [], [], []
        for r in range(repeats + 1):  # first round warms up
            sched = Scheduler(BlockManager(grid.num_blocks, cfg.block_size), 1, 512, 512)
            seq = Sequence(r, prompt, SamplingParams(temperature=0.0), new_tokens)
            sched.add(seq)
            out = grid.execute(sched.build_step(batch := sched.schedule()))  # prefill, not timed
            sched.update(batch, out)
            t0, step_s, comm_s = time.perf_counter(), 0.0, 0.0
            while sched.has_work():
                batch = sched.schedule()
                out = grid.execute(sched.build_step(batch))
                sched.update(batch, out)
                step_s += out.timings["step_s"]
                comm_s += out.timings["comm_s"]
            if r:
                elapsed = time.perf_counter() - t0
                rates.append((new_tokens - 1) / elapsed)
                steps.append(1000 * elapsed / (new_tokens - 1))
                shares.append(comm_s / step_s)
                tokens = seq.output_ids
        return statistics.median(rates), tokens, statistics.median(steps), statistics.median(shares)
    finally:
        grid.shutdown()


def main() -> None:
    """Print one table: HF generate, grid tp=1, grid tp=2."""
    import ray

    from deployments.make_model import write_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/bench-125m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        write_model(args.model, preset="bench-125m", tokenizer=False)
    prompt = [(7 * i + 3) % 31000 + 10 for i in range(args.prompt_len)]
    hf_rate, ref = hf_decode(args.model, prompt, args.new_tokens, args.repeats)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, max(args.tp)), include_dashboard=False,
             _node_ip_address="127.0.0.1")
    rows = [("HF generate", hf_rate, 1000 / hf_rate, None, True)]
    for tp in args.tp:
        rate, tokens, step_ms, share = grid_decode(args.model, tp, prompt, args.new_tokens, args.repeats)
        rows.append((f"grid tp={tp} pp=1", rate, step_ms, share, tokens == ref))
    ray.shutdown()
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; model {args.model}, "
          f"fp32, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'layout':<18}{'tokens/s':>10}{'ms/token':>10}{'vs HF':>8}{'all-reduce %':>14}{'same tokens':>13}")
    for name, rate, ms, share, same in rows:
        ar = "-" if share is None else f"{100 * share:.1f}"
        print(f"{name:<18}{rate:>10.1f}{ms:>10.2f}{rate / hf_rate:>8.2f}{ar:>14}{str(same):>13}")


if __name__ == "__main__":
    main()
