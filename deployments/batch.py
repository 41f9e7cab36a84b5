"""Offline batch generation, the `ray job submit` entry point: JSONL in, JSONL out, over K TP x PP grids.

Results are appended to the output file as they finish; a rerun with the same output skips finished lines.
"""
from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster.config import GridServeConfig
from cluster.generate import Request, failed
from cluster.placement import grids_that_fit
from cluster.replica import Replica
from cluster.request import Result
from cluster.tokenizer import load_tokenizer
from deployments.batch_args import build_config, parse_args
from deployments.batch_io import Progress, ResultLog, Summary, read_requests

log = logging.getLogger("gridserve.batch")
QUEUE_AHEAD_FACTOR = 1.5  # requests handed to a replica per batch seat: the next ones wait in its queue, not ours
MAX_ATTEMPTS = 3  # replicas whose rebuild failed under a request before it is failed


async def drain(queue: asyncio.Queue[Request | None], replicas: list[Replica],
                on_result: Callable[[Result, int], None]) -> None:
    """Feed the shared queue to every replica (a few more requests than its batch, so it never waits on us).

    A replica whose grid fails is healed (`Replica.ready` -> `Replica.heal`, the one failure policy) and its
    requests in flight migrate to the rebuilt grid (`cluster.migration`); a replica whose rebuild fails stops, and
    the requests it could not finish go back to the queue for the others. Workers wait for such hand-backs until
    every request has a result, then a None per worker tells them to stop.
    """
    slots = [r for r, rep in enumerate(replicas) for _ in range(seats(rep.cfg))]
    remaining, attempts = queue.qsize(), Counter[Any]()

    def finish(result: Result, replica: int) -> None:
        nonlocal remaining
        on_result(result, replica)
        remaining -= 1
        if remaining == 0:
            for _ in slots:
                queue.put_nowait(None)

    async def worker(r: int) -> None:
        replica = replicas[r]
        while (req := await queue.get()) is not None:
            if not await replica.ready():  # its rebuild failed: hand the request to the others and stop
                queue.put_nowait(req)
                return
            result = await replica.complete(req.request_id, req.prompt_ids, req.params)
            if result.error is not None and replica.failure() is not None:  # this replica is gone, not the request
                attempts[req.request_id] += 1
                if attempts[req.request_id] < MAX_ATTEMPTS:
                    queue.put_nowait(req)
                    continue
            finish(result, r)

    await asyncio.gather(*(worker(r) for r in slots))
    while not queue.empty():  # every replica failed for good: what is left fails, it is not dropped
        req = queue.get_nowait()
        if req is not None:
            on_result(failed(req.request_id, req.prompt_ids, "every grid failed"), 0)


def seats(cfg: GridServeConfig) -> int:
    """Requests one replica holds at a time: its batch and some queued behind it, within its queue limit."""
    return min(math.ceil(cfg.max_num_seqs * QUEUE_AHEAD_FACTOR), cfg.max_num_seqs + cfg.max_waiting_requests)


def record(rec: dict[str, Any], res: Result, with_text: bool) -> dict[str, Any]:
    """The output line of one finished request."""
    if res.error is not None:
        return {**rec, "error": res.error}
    return {**rec, "text": res.text if with_text else None, "token_ids": res.token_ids,
            "finish_reason": res.finish_reason,
            "usage": {"prompt_tokens": len(res.prompt_ids), "completion_tokens": len(res.token_ids)}}


def run(cfg: GridServeConfig, input_path: Path, output_path: Path, address: str | None = None,
        replicas: int | None = 1, ordered: bool = True) -> Summary:
    """Generate for every unfinished line of `input_path` over `replicas` grids (None: as many as fit)."""
    from cluster.runtime import connect

    tokenizer = load_tokenizer(cfg.model)
    results = ResultLog(output_path)
    assert cfg.max_model_len is not None, "GridServeConfig's validator fills max_model_len"
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
    grids: list[Replica] = []
    try:
        count = min(replicas or grids_that_fit(cfg), len(requests))
        grids = [Replica(cfg, f"grid-{i}") for i in range(count)]
        summary.per_grid = [0] * count
        progress = Progress(len(requests), summary)

        def on_result(res: Result, grid: int) -> None:
            results.append(record(records[res.request_id], res, tokenizer is not None))
            progress.add(res, grid)

        async def main() -> None:
            queue: asyncio.Queue[Request | None] = asyncio.Queue()
            for req in requests:
                queue.put_nowait(req)
            try:
                await drain(queue, grids, on_result)
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



def main(argv: list[str] | None = None) -> int:
    """Command line entry point; exit code 1 if any line failed, 2 for bad arguments."""
    args = parse_args(argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = build_config(args)
    except (ValueError, ValidationError) as exc:
        print(f"gridserve batch: {exc}", file=sys.stderr)
        return 2
    replicas = None if args.replicas == "auto" else int(args.replicas)
    print(f"gridserve batch: writing {args.output.resolve()}", file=sys.stderr, flush=True)
    summary = run(cfg, args.input, args.output, args.address, replicas, args.ordered)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    from cluster.loopback import loopback_if_starting_ray

    loopback_if_starting_ray(sys.argv[1:])  # nothing above imported Ray yet, so this still takes effect
    sys.exit(main())
