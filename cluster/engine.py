"""Async serving engine: many requests in flight, one step loop, tokens streamed per request."""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from actors.shard.sampler import SamplingParams
from cluster.blocks import BlockManager
from cluster.scheduler import Scheduler, Sequence

log = logging.getLogger("gridserve.engine")


@dataclass
class TokenEvent:
    """One streamed item: a new token, and the finish reason on the last one (or an error)."""

    token_id: int | None
    finish_reason: str | None = None
    error: str | None = None


class AsyncEngine:
    """Owns the scheduler of one replica and drives its grid from a single asyncio task."""

    def __init__(self, grid: Any, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.grid = grid
        self.eos = frozenset(eos_token_ids)
        self.scheduler = Scheduler(BlockManager(grid.num_blocks, block_size), max_num_seqs,
                                   max_num_batched_tokens, max_model_len)
        self.streams: dict[int, asyncio.Queue[TokenEvent]] = {}
        self._ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.dead: str | None = None  # set when the grid failed; new requests are refused

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int,
                       stop_token_ids: tuple[int, ...] = (), ignore_eos: bool = False) -> AsyncIterator[TokenEvent]:
        """Stream the tokens of one request; leaving the iterator early aborts it and frees its blocks."""
        if self.dead:
            raise RuntimeError(f"this replica's grid failed ({self.dead}); retry on another replica")
        stops = (frozenset() if ignore_eos else self.eos) | frozenset(stop_token_ids)
        seq = Sequence(next(self._ids), list(prompt_ids), sampling, max_tokens, stops)
        self.scheduler.add(seq)  # ValueError for prompts that can never fit
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.streams[seq.seq_id] = queue
        self._start()
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason is not None or event.error is not None:
                    return
        finally:
            self.streams.pop(seq.seq_id, None)
            if seq.finish_reason is None:
                seq.finish("abort")
                self.scheduler.retire(seq)

    @property
    def num_running(self) -> int:
        """Sequences in the running batch."""
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission."""
        return len(self.scheduler.waiting)

    def _start(self) -> None:
        """Start the step loop on first use and wake it."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._wakeup.set()

    async def _loop(self) -> None:
        """Schedule, run one step on the grid (awaiting its object ref), hand tokens to their streams."""
        while True:
            if not self.scheduler.has_work():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            seqs = self.scheduler.schedule()
            try:
                out = await self.grid.submit(self.scheduler.build_step(seqs))[0]
            except Exception as exc:  # a worker died or a step failed: fail every request, never hang them
                self._fail_all(f"{type(exc).__name__}: {exc}")
                return
            live = [(s, t) for s, t in zip(seqs, out.token_ids) if s.finish_reason != "abort"]
            if not live:
                continue
            live_seqs, tokens = zip(*live)
            self.scheduler.update(list(live_seqs), type(out)(list(tokens)))
            for seq in live_seqs:
                queue = self.streams.get(seq.seq_id)
                if queue is not None:
                    queue.put_nowait(TokenEvent(seq.output_ids[-1], seq.finish_reason))

    def _fail_all(self, reason: str) -> None:
        """End every in-flight and queued request with an error and mark the engine dead."""
        log.error("grid step failed, failing all requests: %s", reason)
        self.dead = reason
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            seq.finish("error")
            self.scheduler.retire(seq)
            queue = self.streams.get(seq.seq_id)
            if queue is not None:
                queue.put_nowait(TokenEvent(None, "error", reason))
