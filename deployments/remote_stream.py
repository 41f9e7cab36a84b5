"""The n choices of one request across a Serve handle: the LLM replica sends coalesced deltas, the ingress gets
objects that read like `cluster.detokenize.TextStream` (what the response builders consume)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from cluster.detokenize import TextStream
from cluster.replica import ReplicaUnavailable
from cluster.request import RequestError

RETRY_AFTER_LOST_S = 1  # Retry-After when the replica died before answering (another one takes the retry)


@dataclass
class ChoiceDelta:
    """New text of one choice since its last delta, with the tokens and logprobs it covers."""

    index: int
    text: str
    reason: str | None
    tokens: int
    logprobs: list[Any] = field(default_factory=list)
    cached_tokens: int = 0
    error: str | None = None


@dataclass
class Refusal:
    """The replica did not take the request: 400 (never servable as sent) or 503 (not now; retry)."""

    status: int
    message: str
    param: str | None = None
    retry_after_s: int = RETRY_AFTER_LOST_S

    def exception(self) -> Exception:
        """The error the ingress's exception handlers turn into the HTTP answer."""
        if self.status == 400:
            return RequestError(self.message, self.param)
        return ReplicaUnavailable(self.message, self.retry_after_s)


async def send_choices(streams: list[TextStream]) -> AsyncIterator[list[ChoiceDelta]]:
    """Replica side: every choice's deltas as they come, batched into one list per wake-up (under load a chunk
    carries one token of each choice instead of one handle message per token)."""
    queue: asyncio.Queue[ChoiceDelta | None] = asyncio.Queue()

    async def pump(index: int, stream: TextStream) -> None:
        tokens = logprobs = 0
        try:
            async for text, reason in stream:
                queue.put_nowait(ChoiceDelta(index, text, reason, stream.num_tokens - tokens,
                                             stream.logprobs[logprobs:], stream.cached_tokens, stream.error))
                tokens, logprobs = stream.num_tokens, len(stream.logprobs)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
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


class LocalChunks:
    """The replica's chunk stream read in the same process (colocated ingress), with the handle stream's cancel."""

    def __init__(self, chunks: AsyncIterator[list[ChoiceDelta] | Refusal]) -> None:
        self.chunks = chunks

    def __aiter__(self) -> "LocalChunks":
        return self

    async def __anext__(self) -> list[ChoiceDelta] | Refusal:
        return await self.chunks.__anext__()

    def cancel(self) -> None:
        """Close the generator (which aborts its requests); if a reader is inside it, that reader's cancellation
        closes it instead."""
        asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        try:
            await self.chunks.aclose()  # type: ignore[attr-defined]
        except RuntimeError:  # "already running": the cancelled reader task is unwinding through it
            pass


class RemoteChoice:
    """Ingress side: one choice's (text delta, finish reason) pairs, plus what TextStream tells after the end."""

    def __init__(self, request: RemoteRequest) -> None:
        self.request = request
        self.queue: asyncio.Queue[ChoiceDelta] = asyncio.Queue()
        self.num_tokens = self.cached_tokens = 0
        self.logprobs: list[Any] = []
        self.error: str | None = None

    def __aiter__(self) -> AsyncIterator[tuple[str, str | None]]:
        return self._run()

    async def _run(self) -> AsyncIterator[tuple[str, str | None]]:
        finished = False
        try:
            while not finished:
                d = await self.queue.get()
                self.num_tokens += d.tokens
                self.logprobs += d.logprobs
                self.cached_tokens, self.error = d.cached_tokens, d.error
                finished = d.reason is not None
                yield d.text, d.reason
        finally:
            if not finished:
                self.request.cancel()  # the client left early: stop the generation on the replica


class RemoteRequest:
    """Reads a replica's chunk stream (a Serve DeploymentResponseGenerator, or LocalChunks) into one RemoteChoice
    per choice."""

    def __init__(self, chunks: Any, n: int) -> None:
        self.chunks = chunks
        self.choices = [RemoteChoice(self) for _ in range(n)]
        self.open = set(range(n))  # choices whose finish has not arrived
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> list[RemoteChoice]:
        """Wait for the first chunk (a refusal raises here, before any response is sent); then read on."""
        try:
            first = await self.chunks.__anext__()
        except Exception as exc:  # the replica died or was unreachable before it answered
            raise ReplicaUnavailable(f"the model replica failed before answering ({type(exc).__name__}); retry",
                                     RETRY_AFTER_LOST_S) from None
        if isinstance(first, Refusal):
            raise first.exception()
        self._deliver(first)
        self.task = asyncio.ensure_future(self._read())
        return self.choices

    def _deliver(self, chunk: list[ChoiceDelta]) -> None:
        """Queue each delta on its choice; a finish closes the choice."""
        for d in chunk:
            self.choices[d.index].queue.put_nowait(d)
            if d.reason is not None:
                self.open.discard(d.index)

    async def _read(self) -> None:
        """Dispatch chunks until the replica ends the stream; a lost replica ends every open choice with an error."""
        lost = "the stream ended early"
        try:
            async for chunk in self.chunks:
                self._deliver(chunk)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            lost = type(exc).__name__
        self._deliver([ChoiceDelta(i, "", "error", 0, error=f"model replica lost ({lost}); retry") for i in self.open])

    def cancel(self) -> None:
        """Abort the generation on the replica (Serve cancels the replica's generator)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.chunks.cancel()
