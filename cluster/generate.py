"""From an engine's token events to text: one stream per choice, and the one helper that collects a stream."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from actors.shard.grammar import GrammarSpec
from cluster.detokenize import TextStream
from cluster.engine import AsyncEngine
from cluster.request import GenerationParams, Result, RequestError


@dataclass
class Request:
    """A tokenized prompt with its generation parameters (what batch lines and tests queue)."""

    request_id: Any
    prompt_ids: list[int]
    params: GenerationParams


def open_stream(engine: AsyncEngine, tokenizer: Any, prompt_ids: list[int], params: GenerationParams,
                index: int = 0, grammar: GrammarSpec | None = None) -> TextStream:
    """Queue choice `index` of a request on `engine` (RequestError at once if it can never fit), its tokens
    constrained by `grammar` if given; its text stream."""
    events = engine.generate(prompt_ids, params.sampling(index), params.max_tokens,
                             tuple(params.stop_token_ids), params.ignore_eos, grammar)
    return TextStream(events, tokenizer, params.stop_list())


async def collect(stream: TextStream) -> tuple[str, str | None]:
    """Run one stream to its end: (text up to any stop string, finish reason); `stream.error` says if it failed."""
    text, reason = "", None
    async for delta, reason in stream:
        text += delta
    return text, reason


async def result_of(request_id: Any, prompt_ids: list[int], stream: TextStream) -> Result:
    """Collect `stream` into the request's Result."""
    text, reason = await collect(stream)
    return Result(request_id, prompt_ids, list(stream.ids), text, reason, stream.error)


async def run_one(engine: AsyncEngine, req: Request, tokenizer: Any) -> Result:
    """Generate one request to the end; a request that cannot fit becomes a failed Result."""
    try:
        stream = open_stream(engine, tokenizer, req.prompt_ids, req.params)
    except RequestError as exc:
        return Result(req.request_id, req.prompt_ids, [], "", None, str(exc))
    return await result_of(req.request_id, req.prompt_ids, stream)


async def generate_all(engine: AsyncEngine, requests: list[Request], tokenizer: Any = None) -> list[Result]:
    """Run every request concurrently on one engine; results in request order."""
    return list(await asyncio.gather(*(run_one(engine, r, tokenizer) for r in requests)))
