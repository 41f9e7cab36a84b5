"""The model deployment's answer as the ingress reads it: a refusal as a value, then the request's chunks of
`ChoiceDelta`s (over a Serve handle, or in-process when colocated), with cancel; which failures mean a lost
replica (503, retry elsewhere) rather than a bug (500)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from cluster.migration import MAX_GRIDS
from cluster.replica import ReplicaUnavailable
from cluster.request import ChoiceDelta, GenerationParams, RequestError, Resume
from deployments.mailbox import END, Inbox, Mailbox, MailboxLost, Mailed

log = logging.getLogger(__name__)

RETRY_AFTER_LOST_S = 1  # Retry-After when the replica died before answering (another one takes the retry)
RETRY_PAUSE_S = 0.5  # between calls that found the lost replica still routed to (Serve drops it within seconds)


Reopen = Callable[[GenerationParams], Any]  # a new streaming call on the model deployment, with these params


@dataclass
class Refusal:
    """The replica did not take the request: 400 (never servable as sent) or 503 (not now; retry)."""

    status: int
    message: str
    param: str | None = None
    retry_after_s: int = RETRY_AFTER_LOST_S
    code: str | None = None  # OpenAI's error code (model_not_found)
    rebuilding: bool = False  # 503 because its grid is being rebuilt: another replica can take it now

    @classmethod
    def of(cls, exc: RequestError | ReplicaUnavailable) -> Refusal:
        """The value that carries a refused request back to the ingress."""
        if isinstance(exc, RequestError):
            return cls(exc.status, str(exc), exc.param, code=exc.code)
        return cls(503, str(exc), retry_after_s=exc.retry_after_s, rebuilding=exc.rebuilding)

    def exception(self) -> Exception:
        """The error the ingress's exception handlers turn into the HTTP answer."""
        if self.status == 503:
            return ReplicaUnavailable(self.message, self.retry_after_s, self.rebuilding)
        return RequestError(self.message, self.param, self.status, self.code)


def replica_lost(exc: BaseException) -> bool:
    """Whether `exc` says the model replica is gone or unreachable (not an error raised by its code)."""
    from ray.exceptions import RayError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, (BackPressureError, DeploymentUnavailableError, MailboxLost)):
        return True
    return isinstance(exc, RayError) and not isinstance(exc, RayTaskError)


class ChunkStream:
    """One request's chunks: `start()` reads the replica's first answer (a refusal raises there, before any
    response is sent), iterating yields the chunks. A replica lost mid-way: with `reopen` (a new call on the
    model deployment, which routes to a live replica) each open choice continues there from the tokens and text
    it already sent (`GenerationParams.resume`), within `migrate_s` of the loss; otherwise it ends with an error.
    With a `mailbox`, a replica on this host sends the chunks there (`deployments.mailbox`) and the call only
    tells its end or its failure."""

    def __init__(self, source: Any, params: GenerationParams, reopen: Reopen | None = None,
                 migrate_s: float = 0.0, mailbox: tuple[Mailbox, Inbox] | None = None,
                 reask: Reopen | None = None) -> None:
        self.source = source  # a Serve DeploymentResponseGenerator, or the replica's own async generator
        self.params, self.reopen, self.migrate_s = params, reopen, migrate_s
        self.mailbox, self.reask = mailbox, reask or reopen  # reask: the first call again, with the same inbox
        self.mailed: asyncio.Queue[Any] | None = None  # the inbox's queue once the replica accepted by mailbox
        self.watcher: asyncio.Future[None] | None = None
        self.open = set(range(params.n))  # choices whose last delta has not arrived
        self.sent: dict[int, tuple[list[int], int]] = {i: ([], 0) for i in self.open}  # tokens, text chars
        self.ended = False  # the replica's stream ran out

    async def start(self) -> ChunkStream:
        """Wait for the replica's acceptance (an empty chunk, or Mailed) or refusal; a replica lost before it
        answered, or one rebuilding its grid, is asked again (`reask`: the request has not started; Serve may route
        it to another replica) until `migrate_s` runs out. Unless the chunks come by mailbox, its inbox is dropped."""
        try:
            first = await self._first()
        except BaseException:
            self._forget()
            raise
        if isinstance(first, Mailed) and self.mailbox is not None:
            self.mailed = self.mailbox[0].queue(self.mailbox[1])
            self.watcher = asyncio.ensure_future(self._watch(self.mailed))
        else:
            self._forget()
        return self

    async def _first(self) -> Any:
        """The replica's acceptance; a refusal raises (400 / 503)."""
        deadline = time.monotonic() + self.migrate_s
        while True:
            try:
                first = await self.source.__anext__()
            except Exception as exc:
                if not replica_lost(exc):
                    raise
                if self.reopen is None or time.monotonic() > deadline:
                    raise ReplicaUnavailable(f"the model replica failed before answering ({type(exc).__name__}); "
                                             "retry", RETRY_AFTER_LOST_S) from None
            else:
                if not (isinstance(first, Refusal) and first.rebuilding and self.reopen is not None
                        and time.monotonic() < deadline):
                    break
            await asyncio.sleep(RETRY_PAUSE_S)
            assert self.reask is not None
            self.source = self.reask(self.params)
        if isinstance(first, Refusal):
            raise first.exception()
        return first

    async def _watch(self, queue: asyncio.Queue[Any]) -> None:
        """Follow the call while the chunks come by mailbox: a failure there (the replica lost, or an error its
        code raised) reaches the reader through the queue; its normal end says nothing (END comes by mailbox)."""
        try:
            async for _ in self.source:
                pass
        except Exception as exc:
            queue.put_nowait(exc)

    async def _from_mailbox(self, queue: asyncio.Queue[Any]) -> AsyncIterator[list[ChoiceDelta]]:
        """The chunks the replica mailed, until END; a failure raises."""
        while (item := await queue.get()) is not END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _forget(self) -> None:
        """Unregister the inbox (the request ended, failed, was refused or cancelled); the watcher ends with the
        call, which the replica ends, or the cancel ended."""
        if self.mailbox is not None:
            self.mailbox[0].drop(self.mailbox[1])

    def __aiter__(self) -> AsyncIterator[list[ChoiceDelta]]:
        return self._read()

    def _note(self, chunk: list[ChoiceDelta]) -> None:
        """Record what the client is being sent: finished choices, each choice's tokens and text so far."""
        for d in chunk:
            if d.finish_reason is not None:
                self.open.discard(d.index)
            ids, chars = self.sent[d.index]
            ids.extend(d.token_ids)  # in place: a long answer is not copied once per token
            self.sent[d.index] = (ids, chars + len(d.text))

    async def _read(self) -> AsyncIterator[list[ChoiceDelta]]:
        lost = "the stream ended early"
        try:
            async for chunk in (self.source if self.mailed is None else self._from_mailbox(self.mailed)):
                self._note(chunk)
                yield chunk
            self.ended = True
        except Exception as exc:
            if not replica_lost(exc):
                raise
            lost = type(exc).__name__
        finally:
            self._forget()
        if self.open and self.reopen is not None and self.migrate_s > 0:
            async for chunk in self._migrate(time.monotonic() + self.migrate_s):
                yield chunk
        if self.open:
            yield [ChoiceDelta(i, "", [], "error", error=f"model replica lost ({lost}); retry") for i in self.open]

    async def _migrate(self, deadline: float) -> AsyncIterator[list[ChoiceDelta]]:
        """The open choices, each continued on a live replica from what it sent; merged as they come."""
        queue: asyncio.Queue[list[ChoiceDelta] | None] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._continue(i, deadline, queue)) for i in sorted(self.open)]
        try:
            for _ in tasks:
                while (chunk := await queue.get()) is not None:
                    yield chunk
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _continue(self, index: int, deadline: float, queue: asyncio.Queue[list[ChoiceDelta] | None]) -> None:
        """Choice `index` from where it stands, on whichever replica takes it, until it finishes or the deadline
        passes (then it stays open and ends with the error). What it queues is noted at once, so a second loss
        resumes after it."""
        assert self.reopen is not None
        losses = 1  # the loss that brought it here; on MAX_GRIDS it ends: it may be what kills them
        try:
            while index in self.open and time.monotonic() < deadline and losses < MAX_GRIDS:
                outcome = await self._one_replica(index, queue)
                if outcome == "refused":
                    return  # this choice cannot be served as it stands: it ends with the error
                if index in self.open:
                    losses += outcome != "busy"  # 'lost', or 'done' while open: its grid failed under it again
                    await asyncio.sleep(RETRY_PAUSE_S)
        except Exception:  # a bug, not a lost replica: the choice ends with the error, the ingress logs why
            log.exception("continuing choice %d on another replica failed", index)
        finally:
            queue.put_nowait(None)

    async def _one_replica(self, index: int, queue: asyncio.Queue[list[ChoiceDelta] | None]) -> str:
        """One try: choice `index` resumed on the replica Serve routes to; 'lost' (again), 'busy' (a 503
        refusal), 'refused' (never servable) or 'done'."""
        assert self.reopen is not None
        ids, chars = self.sent[index]
        seed = None if self.params.seed is None else self.params.seed + index  # as the replica seeds choice `index`
        params = self.params.model_copy(update={
            "n": 1, "seed": seed, "resume": Resume(token_ids=list(ids), text_chars=chars) if ids else None})
        source = self.reopen(params)
        try:
            async for chunk in source:
                if isinstance(chunk, Refusal):
                    return "busy" if chunk.status == 503 else "refused"
                if not chunk:  # the acceptance
                    log.warning("choice %d continues on another replica after %d tokens", index, len(ids))
                    continue
                for d in chunk:
                    d.index, d.cached_tokens = index, None  # the first replica already told the prompt's cache hit
                self._note(chunk)
                queue.put_nowait(chunk)
        except asyncio.CancelledError:
            if hasattr(source, "cancel"):
                source.cancel()  # the client went away: end the generation on that replica too
            raise
        except Exception as exc:
            if not replica_lost(exc):
                raise
            return "lost"
        return "done"

    def cancel(self) -> None:
        """Abort the generation on the replica (the client went away); a no-op once it ended."""
        if self.ended:
            return
        self._forget()
        if hasattr(self.source, "cancel"):
            self.source.cancel()  # Serve cancels the replica's generator
        else:
            asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        try:
            await self.source.aclose()
        except RuntimeError:  # "already running": the cancelled reader task is unwinding through it
            pass


async def open_chunks(local: Any, llm: Any, ids: list[int], params: GenerationParams,
                      migrate_s: float = 0.0, mailbox: Mailbox | None = None) -> ChunkStream:
    """A request's chunks from the colocated replica (`local`) or over the model deployment's handle (`llm`),
    accepted: a refusal raises here (400 / 503). Over the handle, a replica lost under the request is replaced by
    another within `migrate_s` (the config's migration_timeout_s) without the client seeing it; a replica on this
    host sends the chunks to `mailbox` (a choice continued elsewhere after a loss streams over its call)."""
    if local is not None:
        return await ChunkStream(local.generate(ids, params), params).start()
    inbox = await mailbox.inbox() if mailbox is not None else None

    def call(p: GenerationParams, to: Inbox | None = None) -> Any:
        # Deltas over Serve's gRPC transport instead of one Ray object per chunk, where they do not go by mailbox.
        return llm.options(stream=True, _by_reference=False).generate.remote(ids, p, to)

    def first(p: GenerationParams) -> Any:
        return call(p, inbox)
    boxed = None if mailbox is None or inbox is None else (mailbox, inbox)
    return await ChunkStream(first(params), params, call, migrate_s, boxed, first).start()
