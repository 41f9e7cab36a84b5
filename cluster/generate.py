"""From an engine's token events to choices: one text stream per choice, their deltas merged per wake-up, and the
one place deltas are collected into whole choices (the batch job, non-streamed HTTP answers and tests use it)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.detokenize import TextStream
from cluster.engine import AsyncEngine, TokenEvent
from cluster.request import ChoiceDelta, GenerationParams, RequestError, Result, TokenLogprob

Events = AsyncGenerator[TokenEvent, str | None]


@dataclass
class Request:
    """A tokenized prompt with its generation parameters (what batch lines and tests queue)."""

    request_id: Any
    prompt_ids: list[int]
    params: GenerationParams


@dataclass
class Choice:
    """One choice collected from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0
    error: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        """Append one delta."""
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        if delta.cached_tokens is not None:
            self.cached_tokens = delta.cached_tokens
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.error = delta.error or self.error

    def result(self, request_id: Any, prompt_ids: list[int]) -> Result:
        """This choice as the request's Result."""
        return Result(request_id, prompt_ids, self.token_ids, self.text, self.finish_reason, self.error)


def submit(engine: AsyncEngine, prompt_ids: list[int], params: GenerationParams, index: int, max_tokens: int,
           produced: list[int] | None = None) -> Events:
    """Queue choice `index` of a request on `engine` (`max_tokens` as checked by `params.check`; `produced`: the
    tokens it already has, when it resumes); its token events."""
    return engine.generate(prompt_ids, params.sampling(index), max_tokens, tuple(params.stop_token_ids),
                           params.ignore_eos, params.grammar, produced, params.priority, params.lora_slot)


def text_streams(open_events: Callable[[int], Events], tokenizer: Any, params: GenerationParams) -> list[TextStream]:
    """One text stream per choice of a request, over the token events `open_events(index)` queues."""
    return [TextStream(open_events(i), tokenizer, params.stop_list(), i, params.resume) for i in range(params.n)]


async def merge_choices(streams: list[TextStream]) -> AsyncGenerator[list[ChoiceDelta], None]:
    """Every choice's deltas as they come, batched into one list per wake-up (under load a chunk carries one
    token of each choice instead of one message per token). Closing it aborts the unfinished choices."""
    queue: asyncio.Queue[ChoiceDelta | None] = asyncio.Queue()

    async def pump(stream: TextStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait(delta)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        remaining = len(streams)
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            remaining -= batch.count(None)
            if chunk := [d for d in batch if d is not None]:
                yield chunk
    finally:
        for t in tasks:
            t.cancel()  # the caller went away: closing the text streams aborts their requests
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(chunks: AsyncIterable[list[ChoiceDelta]], n: int = 1) -> list[Choice]:
    """Run a request's chunk stream to its end: its n whole choices."""
    choices = [Choice() for _ in range(n)]
    async for chunk in chunks:
        for delta in chunk:
            choices[delta.index].add(delta)
    return choices


def failed(request_id: Any, prompt_ids: list[int], error: str) -> Result:
    """The Result of a request that never ran."""
    return Result(request_id, prompt_ids, [], "", None, error)


async def run_one(engine: AsyncEngine, req: Request, tokenizer: Any) -> Result:
    """Generate one request's first choice to the end; a request that cannot fit becomes a failed Result."""
    try:
        budget = req.params.check(req.prompt_ids, engine.limits())
        params = req.params.model_copy(update={"n": 1})
        streams = text_streams(lambda i: submit(engine, req.prompt_ids, params, i, budget), tokenizer, params)
    except RequestError as exc:
        return failed(req.request_id, req.prompt_ids, str(exc))
    return (await collect(merge_choices(streams)))[0].result(req.request_id, req.prompt_ids)


async def generate_all(engine: AsyncEngine, requests: list[Request], tokenizer: Any = None) -> list[Result]:
    """Run every request concurrently on one engine; results in request order."""
    return list(await asyncio.gather(*(run_one(engine, r, tokenizer) for r in requests)))
