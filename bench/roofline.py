"""Decode at batch 1 against the memory-bandwidth floor: HF `generate`, tp=1, and tp=2 with gloo and with the
shared-memory all-reduce, in one run.

Floor of a decode step = bytes of weights the machine must read per token / the machine's read bandwidth
(every rank reads its shard once per step, the ranks read in parallel, so the sum over ranks is what counts).

python -m bench.roofline [--model models/bench-125m] [--new-tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench.foundation import grid_decode, hf_decode


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of streaming reads over a buffer much larger than the caches (best of `repeats` sums)."""
    torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4)
    x.sum()  # fault the pages in
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 4 / best


def _timed(fn: object) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def weight_bytes(model_dir: str) -> int:
    """fp32 bytes of every parameter the decode step reads (embedding row reads are negligible but counted)."""
    from actors.shard.spec import ModelSpec
    from cluster.planner import rank_weight_bytes

    spec = ModelSpec.from_dir(model_dir)
    return rank_weight_bytes(spec, 1, 1, 0, 4) - spec.vocab_size * spec.hidden_size * 4 * (
        not spec.tie_word_embeddings)  # the embedding is gathered (one row), not streamed


def inprocess_step(model_dir: str, prompt: list[int], steps: int = 20) -> tuple[float, float]:
    """Decode step ms of one tp=1 shard run in this process (no Ray), and the share of it in matmuls."""
    from actors.shard.runner import ShardPlan, StageRunner
    from actors.shard.sampler import SamplingParams
    from actors.shard.tp import TPGroup
    from cluster.blocks import BlockManager
    from cluster.scheduler import Scheduler, Sequence

    torch.set_num_threads(os.cpu_count() or 1)
    runner = StageRunner(ShardPlan(model_dir, 0, 1, 0, 1, None, 512, 16), TPGroup.single(), torch.device("cpu"))
    runner.allocate_cache(64)
    sched = Scheduler(BlockManager(64, 16), 1, 512, 512)
    sched.add(Sequence(0, prompt, SamplingParams(temperature=0.0), 2 * steps + 10))

    def step() -> None:
        batch = sched.schedule()
        sched.update(batch, runner.execute(sched.build_step(batch)))

    for _ in range(6):  # prefill + warm-up
        step()
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    # Weight matmuls run as aten::mm, or aten::bmm where the CPU split matmul (layers.linear) takes them.
    mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm")) / 1e6
    return 1000 * wall / steps, mm / wall


def collectives_per_step(model_dir: str) -> int:
    """TP collectives one decode step issues: 2 per layer, the embedding's all-reduce, the logits gather."""
    return 2 * json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"] + 2


def main() -> None:
    """Print one table: layout, tokens/s, step ms, floor ms, step / floor, all-reduce share and per call, vs HF."""
    import ray

    from deployments.make_model import write_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/bench-125m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        write_model(args.model, preset="bench-125m", tokenizer=False)
    cores = os.cpu_count() or 1
    bandwidth = read_bandwidth(cores)
    floor_ms = 1000 * weight_bytes(args.model) / bandwidth
    prompt = [(7 * i + 3) % 31000 + 10 for i in range(args.prompt_len)]
    hf_rate, ref = hf_decode(args.model, prompt, args.new_tokens, args.repeats)
    ray.init(address="local", num_cpus=max(cores, 2), include_dashboard=False, _node_ip_address="127.0.0.1")
    rows = [("HF generate", hf_rate, 1000 / hf_rate, None, True)]
    for name, tp, shm in (("grid tp=1", 1, True), ("grid tp=2, gloo", 2, False), ("grid tp=2, shared memory", 2, True)):
        rate, tokens, step_ms, share = grid_decode(args.model, tp, prompt, args.new_tokens, args.repeats,
                                                   shm_allreduce=shm)
        rows.append((name, rate, step_ms, share, tokens == ref))
    ray.shutdown()
    local_ms, mm_share = inprocess_step(args.model, prompt)
    collectives = collectives_per_step(args.model)
    print(f"\nmachine: {platform.machine()} {cores} cores, read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"({cores} threads); "
          f"torch {torch.__version__}; model {args.model}, fp32, batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}; floor {floor_ms:.2f} ms/token")
    print("| layout | tokens/s | step ms | floor ms | step / floor | all-reduce % of step | µs per all-reduce | "
          "vs HF | same tokens as HF |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, rate, ms, share, same in rows:
        ar = "–" if not share else f"{100 * share:.1f}"
        per = "–" if not share else f"{1000 * ms * share / collectives:.0f}"
        print(f"| {name} | {rate:.1f} | {ms:.2f} | {floor_ms:.2f} | {ms / floor_ms:.2f} | {ar} | {per} | "
              f"{rate / hf_rate:.2f} | {same} |")
    print(f"\none tp=1 shard in this process (no Ray): {local_ms:.2f} ms per decode step, "
          f"{100 * mm_share:.0f}% of it in matmuls (aten::mm + aten::bmm; weights streamed at "
          f"{weight_bytes(args.model) / (local_ms * mm_share / 1000) / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
