"""The model deployment's answer as the ingress reads it: a refusal as a value, then the request's chunks of
`ChoiceDelta`s (over a Serve handle, or in-process when colocated), with cancel; which failures mean a lost
replica (503, retry elsewhere) rather than a bug (500)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cluster.replica import ReplicaUnavailable
from cluster.request import ChoiceDelta, GenerationParams, RequestError

RETRY_AFTER_LOST_S = 1  # Retry-After when the replica died before answering (another one takes the retry)


@dataclass
class Refusal:
    """The replica did not take the request: 400 (never servable as sent) or 503 (not now; retry)."""

    status: int
    message: str
    param: str | None = None
    retry_after_s: int = RETRY_AFTER_LOST_S
    code: str | None = None  # OpenAI's error code (model_not_found)

    @classmethod
    def of(cls, exc: RequestError | ReplicaUnavailable) -> Refusal:
        """The value that carries a refused request back to the ingress."""
        if isinstance(exc, RequestError):
            return cls(exc.status, str(exc), exc.param, code=exc.code)
        return cls(503, str(exc), retry_after_s=exc.retry_after_s)

    def exception(self) -> Exception:
        """The error the ingress's exception handlers turn into the HTTP answer."""
        if self.status == 503:
            return ReplicaUnavailable(self.message, self.retry_after_s)
        return RequestError(self.message, self.param, self.status, self.code)


def replica_lost(exc: BaseException) -> bool:
    """Whether `exc` says the model replica is gone or unreachable (not an error raised by its code)."""
    from ray.exceptions import RayError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, (BackPressureError, DeploymentUnavailableError)):
        return True
    return isinstance(exc, RayError) and not isinstance(exc, RayTaskError)


class ChunkStream:
    """One request's chunks: `start()` reads the replica's first answer (a refusal raises there, before any
    response is sent), iterating yields the chunks; a replica lost mid-way ends every open choice with an error."""

    def __init__(self, source: Any, n: int) -> None:
        self.source = source  # a Serve DeploymentResponseGenerator, or the replica's own async generator
        self.open = set(range(n))  # choices whose last delta has not arrived
        self.ended = False  # the replica's stream ran out

    async def start(self) -> ChunkStream:
        """Wait for the replica's acceptance (an empty chunk) or refusal."""
        try:
            first = await self.source.__anext__()
        except Exception as exc:
            if not replica_lost(exc):
                raise
            raise ReplicaUnavailable(f"the model replica failed before answering ({type(exc).__name__}); retry",
                                     RETRY_AFTER_LOST_S) from None
        if isinstance(first, Refusal):
            raise first.exception()
        return self

    def __aiter__(self) -> AsyncIterator[list[ChoiceDelta]]:
        return self._read()

    async def _read(self) -> AsyncIterator[list[ChoiceDelta]]:
        lost = "the stream ended early"
        try:
            async for chunk in self.source:
                self.open -= {d.index for d in chunk if d.finish_reason is not None}
                yield chunk
            self.ended = True
        except Exception as exc:
            if not replica_lost(exc):
                raise
            lost = type(exc).__name__
        if self.open:
            yield [ChoiceDelta(i, "", [], "error", error=f"model replica lost ({lost}); retry") for i in self.open]

    def cancel(self) -> None:
        """Abort the generation on the replica (the client went away); a no-op once it ended."""
        if self.ended:
            return
        if hasattr(self.source, "cancel"):
            self.source.cancel()  # Serve cancels the replica's generator
        else:
            asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        try:
            await self.source.aclose()
        except RuntimeError:  # "already running": the cancelled reader task is unwinding through it
            pass


async def open_chunks(local: Any, llm: Any, ids: list[int], params: GenerationParams) -> ChunkStream:
    """A request's chunks from the colocated replica (`local`) or over the model deployment's handle (`llm`),
    accepted: a refusal raises here (400 / 503)."""
    if local is not None:
        source: Any = local.generate(ids, params)
    else:
        # Deltas over Serve's gRPC transport instead of one Ray object per chunk (a message per token per request).
        source = llm.options(stream=True, _by_reference=False).generate.remote(ids, params)
    return await ChunkStream(source, params.n).start()
