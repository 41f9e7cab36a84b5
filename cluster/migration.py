"""Request migration: a choice whose grid fails under it continues on the rebuilt grid from its prompt plus the
tokens it already produced, so its client sees neither an error nor a repeated or missing token.

The resumed sequence is recomputed like a preempted one: seeded sampling keys on the output position, penalties
read the produced tokens, the grammar matcher replays them; the text stream above keeps its detokenizer and
stop-string buffer. Only when no grid serves again within the timeout, or the choice was in flight on
`MAX_GRIDS` failed grids (it may be what kills them), does it end with the error.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from cluster.engine import AsyncEngine, TokenEvent
from cluster.generate import Events, submit
from cluster.request import GenerationParams

MAX_GRIDS = 3  # a choice in flight on this many failed grids fails: it may be what kills them


class Resumable:
    """How to reach the current engine of a replica and wait for it to serve again."""

    def __init__(self, engine: Callable[[], AsyncEngine], ready: Callable[[], Awaitable[bool]],
                 timeout_s: float) -> None:
        self.engine, self.ready, self.timeout_s = engine, ready, timeout_s
        # True under Serve's split app: a failed choice ends at once, without an error, and the ingress continues
        # it from what it sent on another replica (or this one, rebuilt) instead of it waiting for this rebuild.
        self.hand_back = False

    def open(self, prompt_ids: list[int], params: GenerationParams, index: int, max_tokens: int) -> Events:
        """Choice `index`'s token events, migrating across grid failures; queued now (errors raise here). A
        choice that resumes (`params.resume`, from a lost replica) starts after the tokens it already has."""
        produced = list(params.resume.token_ids) if params.resume is not None else []
        first = submit(self.engine(), prompt_ids, params, index, max_tokens, produced or None)
        return self._events(first, prompt_ids, params, index, max_tokens, produced)

    async def _events(self, events: Events, prompt_ids: list[int], params: GenerationParams, index: int,
                      max_tokens: int, produced: list[int]) -> Events:
        for grid in range(1, MAX_GRIDS + 1):
            failed: TokenEvent | None = None
            try:
                async for ev in events:
                    if ev.error is not None:  # the grid failed (the engine's only error): try to move on
                        failed = ev
                        break
                    if ev.token_id is not None:
                        produced.append(ev.token_id)
                    ended = yield ev
                    if ended is not None:  # the consumer finished it (a stop string): tell the engine
                        await _finish(events, ended)
                        return
                    if ev.finish_reason is not None:
                        return
            finally:
                await events.aclose()
            if failed is None or self.hand_back:
                return
            resumed = None
            if grid < MAX_GRIDS:
                deadline = time.monotonic() + self.timeout_s  # the bound runs from the failure, not the request
                resumed = await self._resubmit(deadline, prompt_ids, params, index, max_tokens, produced)
            if resumed is None:
                yield failed
                return
            events = resumed

    async def _resubmit(self, deadline: float, prompt_ids: list[int], params: GenerationParams, index: int,
                        max_tokens: int, produced: list[int]) -> Events | None:
        """The choice queued again on a grid that serves, or None once the deadline passes."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                serving = await asyncio.wait_for(self.ready(), left)
            except asyncio.TimeoutError:
                return None
            if not serving:
                return None  # the rebuild itself failed: this replica cannot take it
            try:
                return submit(self.engine(), prompt_ids, params, index, max_tokens, produced)
            except RuntimeError:  # failed again before we got in: wait for the next rebuild
                await asyncio.sleep(min(0.1, max(0.0, left)))
        return None


async def _finish(events: Events, reason: str) -> None:
    """Send the consumer's finish reason into the engine's stream (which then ends)."""
    try:
        await events.asend(reason)
    except StopAsyncIteration:
        pass
