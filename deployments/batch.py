"""Offline batch generation, the `ray job submit` entry point: JSONL in, JSONL out, over K TP x PP grids.

Results are appended to the output file as they finish; a rerun with the same output skips finished lines.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster.config import DEFAULT_MODEL, GridServeConfig, args_from_serve_config
from cluster.generate import Request, Result, run_one
from cluster.tokenizer import load_tokenizer
from deployments.batch_io import ResultLog, read_requests

log = logging.getLogger("gridserve.batch")


@dataclass
class Summary:
    """What a run did, for the final line and for callers."""

    requests: int = 0
    skipped: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    per_grid: list[int] = field(default_factory=list)  # requests finished by each grid

    def line(self) -> str:
        """The final summary line of the job log."""
        rate = self.completion_tokens / max(self.wall_s, 1e-9)
        return (f"gridserve batch: {self.requests} requests ({self.skipped} already done, skipped), {self.failed} "
                f"failed, {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
                f"{self.wall_s:.2f} s, {rate:.1f} tokens/s, per grid {self.per_grid}")


def build_config(args: argparse.Namespace) -> GridServeConfig:
    """Config file args first, then explicit command-line flags on top."""
    fields: dict[str, Any] = args_from_serve_config(args.config) if args.config else {}
    for name in ("model", "tensor_parallel_size", "pipeline_parallel_size", "dtype", "max_model_len",
                 "max_num_seqs", "cpus_per_worker"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if "model" not in fields or fields["model"] == DEFAULT_MODEL:
        from deployments.make_model import ensure_default_model
        fields = ensure_default_model(fields)  # the bundled demo model, written on first use
    return GridServeConfig.from_args(fields)


def grids_that_fit(cfg: GridServeConfig) -> int:
    """How many grids the connected cluster can hold right now (`--replicas auto`)."""
    import ray

    free = ray.available_resources()
    if free.get("GPU", 0) >= cfg.world_size and cfg.resource != "CPU":
        return int(free["GPU"] // cfg.world_size)
    return max(1, int(free.get("CPU", 0) // (cfg.world_size * cfg.cpus_per_worker)))


class Progress:
    """A tqdm bar on stderr (requests done, tokens/s, ETA) that also keeps the summary counts."""

    def __init__(self, total: int, summary: Summary) -> None:
        from tqdm import tqdm

        self.summary, self.start = summary, time.perf_counter()
        self.bar = tqdm(total=total, desc="gridserve batch", unit="req", file=sys.stderr, mininterval=1.0)

    def add(self, result: Result, grid: int) -> None:
        """Count one finished request."""
        s = self.summary
        s.failed += result.error is not None
        s.prompt_tokens += len(result.prompt_ids)
        s.completion_tokens += len(result.token_ids)
        s.per_grid[grid] += 1
        self.bar.set_postfix_str(f"{s.completion_tokens / (time.perf_counter() - self.start):.1f} tok/s",
                                 refresh=False)
        self.bar.update(1)


async def drain(queue: asyncio.Queue[Request | None], engines: list[Any], tokenizer: Any, on_result: Any) -> None:
    """Feed the shared queue to every engine (a few more requests than its batch, so it never waits on us).

    A grid that dies hands its unfinished requests back to the queue for the live grids; workers wait for
    such hand-backs until every request has a result, then a None per worker tells them to stop.
    """
    slots = [g for g, engine in enumerate(engines) for _ in range(math.ceil(engine.scheduler.max_num_seqs * 1.5))]
    remaining = queue.qsize()

    async def worker(grid: int) -> None:
        nonlocal remaining
        engine = engines[grid]
        while (req := await queue.get()) is not None:
            if engine.dead:  # this grid died: hand the request to the others and stop taking work
                queue.put_nowait(req)
                return
            try:
                result = await run_one(engine, req, tokenizer)
            except RuntimeError as exc:  # the engine died between the check and the call
                result = Result(req.request_id, req.prompt_ids, [], "", None, str(exc))
            if result.error is not None and engine.dead and any(not e.dead for e in engines):
                queue.put_nowait(req)  # not the request's fault: a live grid redoes it
                return
            on_result(result, grid)
            remaining -= 1
            if remaining == 0:
                for _ in slots:
                    queue.put_nowait(None)

    await asyncio.gather(*(worker(g) for g in slots))
    while not queue.empty():  # every grid died: what is left fails, it is not dropped
        req = queue.get_nowait()
        if req is not None:
            on_result(Result(req.request_id, req.prompt_ids, [], "", None, "every grid failed"), 0)


def run(cfg: GridServeConfig, input_path: Path, output_path: Path, address: str | None = None,
        replicas: int | None = 1, ordered: bool = True) -> Summary:
    """Generate for every unfinished line of `input_path` over `replicas` grids (None: as many as fit)."""
    from cluster.engine import AsyncEngine
    from cluster.grid import WorkerGrid
    from cluster.runtime import connect

    tokenizer = load_tokenizer(cfg.model)
    results = ResultLog(output_path)
    requests, records, skipped = read_requests(input_path.read_bytes().splitlines(), tokenizer,
                                               cfg.spec().vocab_size, cfg.max_model_len, results.finished())
    for n in sorted(records):
        if "error" in records[n]:
            results.append(records[n])
    summary = Summary(requests=len(records), skipped=skipped, failed=sum("error" in r for r in records.values()))
    if not requests:  # nothing left to generate: no cluster needed
        results.finalize(ordered)
        print(summary.line(), file=sys.stderr, flush=True)
        return summary
    started = connect(cfg, address, replicas or 1)
    grids: list[WorkerGrid] = []
    try:
        count = min(replicas or grids_that_fit(cfg), len(requests))
        grids = [WorkerGrid(cfg) for _ in range(count)]
        summary.per_grid = [0] * count
        progress = Progress(len(requests), summary)

        def on_result(res: Result, grid: int) -> None:
            rec = records[res.request_id]
            if res.error is not None:
                rec["error"] = res.error
            else:
                rec.update(text=res.text if tokenizer is not None else None, token_ids=res.token_ids,
                           finish_reason=res.finish_reason,
                           usage={"prompt_tokens": len(res.prompt_ids), "completion_tokens": len(res.token_ids)})
            results.append(rec)
            progress.add(res, grid)

        async def main() -> None:
            spec = cfg.spec()
            engines = [AsyncEngine.from_config(g, g.cfg, spec.eos_token_ids) for g in grids]
            queue: asyncio.Queue[Request | None] = asyncio.Queue()
            for req in requests:
                queue.put_nowait(req)
            try:
                await drain(queue, engines, tokenizer, on_result)
            finally:
                for g in grids:
                    g.close_dag()

        start = time.perf_counter()
        asyncio.run(main())
        summary.wall_s = time.perf_counter() - start
        progress.bar.close()
    finally:
        for g in grids:
            g.shutdown()
        if started:
            import ray
            ray.shutdown()
    results.finalize(ordered)
    print(summary.line(), file=sys.stderr, flush=True)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="Ray Serve config file whose first application's args configure the grid")
    ap.add_argument("--model", help="local Hugging Face model folder")
    ap.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int)
    ap.add_argument("--pipeline-parallel-size", dest="pipeline_parallel_size", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--max-model-len", dest="max_model_len", type=int)
    ap.add_argument("--max-num-seqs", dest="max_num_seqs", type=int)
    ap.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, help="CPU clusters: cores per worker")
    ap.add_argument("--replicas", default="1", help="grids side by side (data parallel): a number or 'auto' "
                    "(as many as the cluster fits)")
    ap.add_argument("--input", required=True, type=Path, help="JSONL file of requests")
    ap.add_argument("--output", required=True, type=Path, help="JSONL results; rerunning with the same file "
                    "skips the lines already finished")
    ap.add_argument("--ordered", action=argparse.BooleanOptionalAction, default=True,
                    help="final file in input order (default) or in completion order")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; exit code 1 if any line failed, 2 for bad arguments."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = build_config(args)
        if args.replicas != "auto" and (not args.replicas.isdigit() or int(args.replicas) < 1):
            raise ValueError(f"--replicas {args.replicas!r}: expected a positive number or 'auto'")
        if not args.input.is_file():
            raise ValueError(f"--input {args.input}: not a readable file")
        if not args.output.parent.is_dir():
            raise ValueError(f"--output {args.output}: folder {args.output.parent} does not exist")
    except (ValueError, ValidationError) as exc:
        print(f"gridserve batch: {exc}", file=sys.stderr)
        return 2
    replicas = None if args.replicas == "auto" else int(args.replicas)
    print(f"gridserve batch: writing {args.output.resolve()}", file=sys.stderr, flush=True)
    summary = run(cfg, args.input, args.output, args.address, replicas, args.ordered)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    from deployments.cli import loopback_if_starting_ray

    loopback_if_starting_ray(sys.argv[1:])  # nothing above imported Ray yet, so this still takes effect
    sys.exit(main())
