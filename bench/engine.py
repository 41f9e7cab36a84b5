"""Engine benchmarks, each with its reference in the same run: continuous-batching throughput vs HF `generate`,
pipeline micro-batching, per-step dispatch overhead, and streaming latency under concurrency.

python -m bench.engine [--only throughput pipeline dispatch latency] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import time
from typing import Any

import numpy as np
import ray
import torch

from actors.shard.runner import StepInput, StepOutput
from bench.common import BENCH_MODEL, BUDGET, CORES, ensure_model, greedy, make_grid, model_info, prompts, table
from cluster.engine import AsyncEngine
from cluster.grid import WorkerGrid

SMALL_MODEL = "models/bench-small-256"  # hidden 256, 4 layers: the --quick latency model


def make_engine(grid: Any, max_num_seqs: int, max_inflight: int | None = None) -> AsyncEngine:
    """An engine over `grid` (or a proxy of it) with the benchmark's token budget."""
    return AsyncEngine(grid, grid.cfg.block_size, max_num_seqs, BUDGET, grid.cfg.max_model_len,
                       max_inflight=max_inflight)


async def stream_all(engine: AsyncEngine, reqs: list[list[int]], new: int) -> tuple[float, list[list[float]]]:
    """Start every request at once (greedy, eos ignored); returns t0 and each stream's event arrival times."""
    async def one(prompt: list[int]) -> list[float]:
        times = []
        async for ev in engine.generate(prompt, greedy(), new, ignore_eos=True):
            if ev.error:
                raise RuntimeError(ev.error)
            times.append(time.perf_counter())
        assert len(times) == new, f"stream ended after {len(times)} of {new} tokens"
        return times

    t0 = time.perf_counter()
    return t0, list(await asyncio.gather(*(one(p) for p in reqs)))


def run_streams(grid: Any, reqs: list[list[int]], new: int, max_inflight: int | None = None,
                ) -> tuple[float, list[list[float]], AsyncEngine]:
    """One fresh engine over `grid`: a short warm-up, then all `reqs`; returns wall s, event times, engine."""
    async def main() -> tuple[float, list[list[float]], AsyncEngine]:
        warm = make_engine(grid, 2, max_inflight)  # held to the end: its idle loop task must not be GC'd
        await stream_all(warm, reqs[:2], 4)
        engine = make_engine(grid, len(reqs), max_inflight)
        t0, times = await stream_all(engine, reqs, new)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # the engines' idle step loops (AsyncEngine has no close())
        return max(t[-1] for t in times) - t0, [[t0] + t for t in times], engine

    return asyncio.run(main())


def hf_throughput(model: str, reqs: list[list[int]], new: int, batch: int) -> float:
    """Generated tokens/s of HF `generate` over `reqs` in static left-padded greedy batches of `batch`."""
    import transformers

    torch.set_num_threads(CORES)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None

    def run(chunk: list[list[int]], n: int) -> None:
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,  # noqa: F821 (the del is after its last call)
                          max_new_tokens=n, min_new_tokens=n)
        assert out.shape == (len(chunk), width + n)

    with torch.inference_mode():
        run(reqs[:batch], 4)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(reqs), batch):
            run(reqs[i:i + batch], new)
        wall = time.perf_counter() - t0
    del hf
    gc.collect()
    return len(reqs) * new / wall


def part_throughput(quick: bool) -> None:
    """Engine (all requests at once, continuous batching) vs HF static batches of 8: generated tokens/s."""
    n, plen, new, batch = (16, 128, 32, 8) if quick else (64, 128, 128, 8)
    model = ensure_model(BENCH_MODEL)
    reqs = prompts(n, plen, model)
    hf_rate = hf_throughput(model, reqs, new, batch)
    grid = make_grid(model)
    try:
        wall, _, engine = run_streams(grid, reqs, new)
    finally:
        grid.shutdown()
    rate = n * new / wall
    table(f"throughput: {n} requests x (prompt {plen} + {new} new tokens), {model_info(model)}",
          ["system", "tokens/s", "wall s", "steps", "vs HF"],
          [[f"HF generate, static batches of {batch}", hf_rate, n * new / hf_rate, "-", 1.0],
           [f"gridserve tp=1 pp=1, max_num_seqs={n}", rate, wall, engine.stats.steps, rate / hf_rate]],
          ["tokens/s = generated tokens / wall time from first submit to last token (prefill included), greedy,",
           f"eos ignored. HF: {CORES} torch threads, left-padded + attention mask. gridserve: one worker with "
           f"{CORES} threads, all requests submitted together, prefill chunk {BUDGET} tokens."])


class Recorder:
    """Grid proxy that keeps every step's answer ref, so each stage's per-step compute can be read after."""

    def __init__(self, grid: WorkerGrid) -> None:
        self.grid, self.refs = grid, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    async def step_async(self, step: StepInput) -> StepOutput:
        """Launch the step with plain actor calls on the real grid and remember the ref that answers it."""
        ref = self.grid.submit(step)[0]
        self.refs.append(ref)
        return await ref

    def stage_busy_s(self, skip: int) -> list[float]:
        """Each stage's summed compute (`stage_<k>_s`) over the recorded steps after the first `skip` (warm-up)."""
        outs = ray.get(self.refs[skip:])
        return [sum(out.timings[f"stage_{k}_s"] for out in outs) for k in range(self.grid.pp)]


def part_pipeline(quick: bool) -> None:
    """pp=2 grids with three layer partitions, each micro-batched (max_inflight=2) and one step at a time."""
    n, plen, new = (32, 64, 32) if quick else (32, 64, 64)
    model = ensure_model(BENCH_MODEL)
    reqs = prompts(n, plen, model)
    rows, base = [], 0.0
    for partition in ("even", [7, 5], "balanced"):
        grid = make_grid(model, pp=2, partition=partition)
        try:
            for inflight in (1, 2):
                rec = Recorder(grid)
                wall, _, engine = run_streams(rec, reqs, new, max_inflight=inflight)
                busy = rec.stage_busy_s(len(rec.refs) - engine.stats.steps)
                rate = n * new / wall
                base = base or rate  # the first run: even split, one step at a time (what pp=2 did before)
                name = partition if isinstance(partition, str) else "explicit"
                rows.append([f"{name} {list(grid.cfg.layer_partition())}", inflight, rate, rate / base, wall,
                             engine.stats.steps, *(100 * (1 - b / wall) for b in busy)])
        finally:
            grid.shutdown()
    table(f"pipeline: tp=1 pp=2, {n} requests x (prompt {plen} + {new} new tokens), {model_info(model)}",
          ["layers per stage", "max_inflight", "tokens/s", "vs first row", "wall s", "steps", "stage 0 idle %",
           "stage 1 idle %"], rows,
          ["stage k idle % = 1 - (sum over steps of stage k's own compute, StepOutput.timings['stage_<k>_s']) / wall:",
           "the bubble. Stage 1 also runs the LM head (as many weight reads as ~3.9 layers here), so 'even' (the",
           "default) leaves it the busier stage; 'balanced' moves layers to stage 0 by weight reads. max_inflight=2",
           f"splits the running batch into 2 micro-batches in flight. Each worker: {CORES / 2:g} CPU, 1 torch thread."])


def part_dispatch(quick: bool) -> None:
    """Per-step dispatch overhead beside Ray's own floor (bench/dispatch.py)."""
    from bench.dispatch import part_dispatch as run

    run(quick)


def part_latency(quick: bool) -> None:
    """TTFT and inter-token latency p50/p99 at 1, 8 and 32 concurrent streams on a tp=1 pp=1 grid."""
    plen, new = 64, 64
    model = ensure_model(SMALL_MODEL, preset="tiny") if quick else ensure_model(BENCH_MODEL)
    grid = make_grid(model)
    rows = []
    try:
        for streams in (1, 8, 32):
            wall, times, _ = run_streams(grid, prompts(streams, plen, model), new)
            ttft = [1000 * (t[1] - t[0]) for t in times]
            itl = [1000 * g for t in times for g in np.diff(t[1:])]
            rows.append([streams, *np.percentile(ttft, [50, 99]), *np.percentile(itl, [50, 99]), streams * new / wall])
    finally:
        grid.shutdown()
    table(f"latency: tp=1 pp=1, prompt {plen} + {new} new tokens per stream, {model_info(model)}",
          ["streams", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "tokens/s"], rows,
          ["All streams start together. TTFT = first TokenEvent - submit; ITL = gaps between a stream's later",
           f"events, pooled over streams. Prefill chunk {BUDGET} tokens: at 32 streams the prompts take 2 steps."])


PARTS = {"throughput": part_throughput, "pipeline": part_pipeline, "dispatch": part_dispatch,
         "latency": part_latency}


def main() -> None:
    """Run the chosen parts, one table each, and shut every grid and Ray down."""
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    ap.add_argument("--quick", action="store_true", help="smaller runs (see each table's title)")
    args = ap.parse_args()
    ensure_model(BENCH_MODEL)
    print(f"machine: {platform.machine()} {CORES} cores (grids on CPU); torch {torch.__version__}, "
          f"Ray {ray.__version__}, transformers {transformers.__version__}; model {model_info(BENCH_MODEL)}"
          f"{'; --quick' if args.quick else ''}")
    ray.init(address="local", num_cpus=max(CORES, 4), include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        for name in args.only:
            start = time.perf_counter()
            PARTS[name](args.quick)
            print(f"  ({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
