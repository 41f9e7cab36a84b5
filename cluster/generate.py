"""Run a set of requests through the async engine and collect results as they finish (batch jobs, tests)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.shard.sampler import SamplingParams
from cluster.detokenize import TextStream
from cluster.engine import AsyncEngine


@dataclass
class Request:
    """One generation request, already tokenized."""

    request_id: Any
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Result:
    """A finished (or failed) request."""

    request_id: Any
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    error: str | None = None


async def run_one(engine: AsyncEngine, req: Request, tokenizer: Any) -> Result:
    """Generate one request to the end; text is detokenized (and cut at stop strings) when a tokenizer is given."""
    try:
        events = engine.generate(req.prompt_ids, req.sampling, req.max_tokens, tuple(req.stop_token_ids),
                                 req.ignore_eos)
    except ValueError as exc:
        return Result(req.request_id, req.prompt_ids, [], "", None, str(exc))
    if tokenizer is None:
        ids, reason, error = [], None, None
        async for ev in events:
            if ev.token_id is not None:
                ids.append(ev.token_id)
            reason, error = ev.finish_reason, ev.error
        return Result(req.request_id, req.prompt_ids, ids, "", reason, error)
    stream, text, reason = TextStream(events, tokenizer, req.stop), "", None
    async for delta, reason in stream:
        text += delta
    return Result(req.request_id, req.prompt_ids, stream.ids, text, reason, stream.error)


async def generate_all(engine: AsyncEngine, requests: list[Request], tokenizer: Any = None,
                       on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Run every request concurrently; `on_result` sees each one as soon as it finishes."""
    async def one(req: Request) -> Result:
        result = await run_one(engine, req, tokenizer)
        if on_result is not None:
            on_result(result)
        return result

    return list(await asyncio.gather(*(one(r) for r in requests)))


def generate_sync(grid: Any, requests: list[Request], block_size: int, max_num_seqs: int = 32,
                  max_model_len: int = 256, tokenizer: Any = None, eos_token_ids: tuple[int, ...] = (),
                  max_inflight: int | None = None) -> list[Result]:
    """Blocking convenience: a fresh engine over `grid`, all requests, results in request order."""
    async def main() -> list[Result]:
        engine = AsyncEngine(grid, block_size, max_num_seqs, max(max_model_len, 1), max_model_len, eos_token_ids,
                             max_inflight)
        try:
            return await generate_all(engine, requests, tokenizer)
        finally:
            if hasattr(grid, "close_dag"):
                grid.close_dag()  # inside the loop that ran it: its channel tasks end cleanly

    return asyncio.run(main())
