"""Async serving engine: many requests in flight, pipelined steps, tokens streamed per request."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np

from actors.shard.runner import NO_TOKEN, StepOutput
from actors.shard.sampler import SamplingParams
from cluster.blocks import BlockManager
from cluster.engine_contract import EngineStats, StepGrid, TokenEvent
from cluster.metrics import RequestMetrics
from cluster.placement import async_scheduling_on
from cluster.request import Limits
from cluster.scheduler import Scheduler, Sequence
from cluster.speculative import Drafter, SpeculativeConfig
from cluster.structured import GrammarMatchers, GrammarSpec

__all__ = ["AsyncEngine", "EngineStats", "StepGrid", "TokenEvent"]  # the contract types are imported from here too

log = logging.getLogger("gridserve.engine")
POOL = SamplingParams(temperature=0.0)  # what an embedding's sequence carries: it never samples


class AsyncEngine:
    """Owns one replica's scheduler and drives its grid from one asyncio task.

    With pipeline parallelism it keeps up to `max_inflight` steps (micro-batches over disjoint sequences)
    in flight, so stage 0 works on micro-batch i+1 while stage 1 works on micro-batch i.
    """

    def __init__(self, grid: StepGrid, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...] = (), max_inflight: int | None = None,
                 step_timeout_s: float | None = None, prefix_caching: bool = True,
                 metrics: RequestMetrics | None = None, grammars: GrammarMatchers | None = None,
                 speculative: SpeculativeConfig | None = None, drafter: Drafter | None = None,
                 async_scheduling: bool = True) -> None:
        self.grid = grid
        self.step_timeout_s = step_timeout_s  # a step slower than this means a stuck or dead worker
        self.eos = frozenset(eos_token_ids)
        self.max_inflight = max_inflight or grid.pp
        self.metrics = metrics
        self.scheduler = Scheduler(BlockManager(grid.num_blocks, block_size, prefix_caching), max_num_seqs,
                                   max_num_batched_tokens, max_model_len, grammars, speculative, drafter)
        # With one stage, the workers that embed are those that sample (rank 0 shares its tokens with its TP peers):
        # the next step can go out before this one answers, its decodes reading the tokens just sampled
        # (Scheduler._followers). With pp > 1 the first stage never sees them.
        self.scheduler.lookahead = async_scheduling and grid.pp == 1 and speculative is None
        self.slots = self.max_inflight + self.scheduler.lookahead  # steps the grid may hold at once
        self.streams: dict[int, asyncio.Queue[TokenEvent]] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dead: str | None = None  # set when the grid failed; new requests are refused

    def limits(self, vocab_size: int | None = None) -> Limits:
        """What a request must fit: the context length and the tokens the whole KV cache holds."""
        blocks = self.scheduler.blocks
        return Limits(self.scheduler.max_model_len, blocks.num_blocks * blocks.block_size, vocab_size)

    def generate(self, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int,
                 stop_token_ids: tuple[int, ...] = (), ignore_eos: bool = False, grammar: GrammarSpec | None = None,
                 resume: list[int] | None = None, priority: int = 0, lora: tuple[int, int] | None = None,
                 ) -> AsyncGenerator[TokenEvent, str | None]:
        """Queue one request now and return its token stream; `max_tokens` is what `GenerationParams.check`
        returned against `limits()`. RuntimeError if the grid failed, RequestError if `grammar` cannot be
        compiled for this tokenizer. `resume`: tokens this request already generated elsewhere; it goes on
        from there (recomputed like a preempted sequence: same seeds by position, penalties, grammar state).
        Lower `priority` is admitted first and preempted last. `lora`: (slot, prefix-cache root) of the LoRA
        adapter it runs with, pinned by the caller until the stream ends (None: the base model).

        Leaving the stream early aborts the request and frees its blocks. Call from the event loop.
        """
        if self.dead:
            raise RuntimeError(f"this replica's grid failed ({self.dead}); retry on another replica")
        stops = (frozenset() if ignore_eos else self.eos) | frozenset(stop_token_ids)
        if sampling.min_tokens and stops:  # the sampler keeps these out until min_tokens are generated
            sampling = dataclasses.replace(sampling, stop_ids=tuple(sorted(stops)))
        seq = Sequence(next(self._ids), list(prompt_ids), sampling, max_tokens, stops, list(resume or []),
                       arrival=time.perf_counter(), grammar=grammar, priority=priority)
        if lora is not None:
            seq.lora_slot, seq.lora_root = lora
            seq.hash_parent = seq.lora_root
        self.scheduler.add(seq)
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.streams[seq.seq_id] = queue
        self._start()
        return self._stream(seq, queue)

    async def embed(self, prompt_ids: list[int], priority: int = 0) -> np.ndarray:
        """Queue a prompt whose answer is its last token's final hidden state (prefill only, nothing generated) and
        wait for it: float32 [hidden]. RuntimeError if the grid fails meanwhile. Call from the event loop."""
        if self.dead:
            raise RuntimeError(f"this replica's grid failed ({self.dead}); retry on another replica")
        seq = Sequence(next(self._ids), list(prompt_ids), POOL, 1, arrival=time.perf_counter(), priority=priority,
                       pool=True)
        self.scheduler.add(seq)
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.streams[seq.seq_id] = queue
        self._start()
        try:
            event = await queue.get()
        finally:
            self.streams.pop(seq.seq_id, None)
            if seq.finish_reason is None:  # the caller went away first
                seq.finish("abort")
                self.scheduler.retire(seq)
        if event.error is not None or seq.hidden is None:
            raise RuntimeError(event.error or "the grid answered no hidden state")
        return seq.hidden

    async def _stream(self, seq: Sequence, queue: asyncio.Queue[TokenEvent]) -> AsyncGenerator[TokenEvent, str | None]:
        """Yield the request's events until its last (observing TTFT, ITL, e2e); `asend(reason)` finishes it
        early with that reason (a stop string); leaving without one aborts it."""
        m, last = self.metrics, None
        try:
            while True:
                event = await queue.get()
                now = time.perf_counter()
                final = event.finish_reason is not None or event.error is not None
                if m is not None and event.error is None:  # before yielding: the consumer may stop here
                    (m.ttft if last is None else m.itl).observe(now - (seq.arrival if last is None else last))
                    if final:
                        m.e2e.observe(now - seq.arrival)
                last = now
                ended = yield event
                if ended is not None:  # the consumer ended it (a stop string in the text): a normal finish
                    seq.finish(ended)
                    self.scheduler.retire(seq)
                    if m is not None:
                        m.e2e.observe(now - seq.arrival)
                    return
                if final:
                    return
        finally:
            self.streams.pop(seq.seq_id, None)
            if seq.finish_reason is None:
                seq.finish("abort")
                self.scheduler.retire(seq)
            if m is not None:
                m.finished(seq.finish_reason or "abort", len(seq.prompt_ids), len(seq.output_ids))

    @property
    def num_running(self) -> int:
        """Sequences in the running batch."""
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission."""
        return len(self.scheduler.waiting)

    def pending_tokens(self) -> int:
        """Work left: prompt tokens not yet in the cache plus tokens still to generate, over all sequences."""
        seqs = list(self.scheduler.running) + list(self.scheduler.waiting)
        return sum(len(s.tokens) - s.num_cached + s.max_tokens - len(s.output_ids) for s in seqs)

    def _start(self) -> None:
        """Start the step loop on first use and wake it."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._wakeup.set()

    def _micro_batch(self) -> int:
        """Sequences per decode step: the running batch split into `max_inflight` micro-batches."""
        return max(1, math.ceil(len(self.scheduler.running) / self.max_inflight))

    def _prompt_share(self, free_slots: int) -> int | None:
        """Prompt tokens the next step may take when several pipeline slots are free: those pending, spread over
        the slots, so a burst of prompts fills every stage at once instead of riding in the first micro-batch
        while the others carry nothing. None (the whole budget) with one slot."""
        if free_slots < 2:
            return None
        return max(1, math.ceil(self.scheduler.pending_prompt_tokens() / free_slots))

    async def _loop(self) -> None:
        """Keep the pipeline full: launch steps while slots and ready sequences exist, finish them as they land."""
        inflight: dict[asyncio.Future[Any], list[Sequence]] = {}
        while True:
            self._launch(inflight)
            self._wakeup.clear()
            if not inflight:
                await self._wakeup.wait()
                continue
            waker = asyncio.ensure_future(self._wakeup.wait())
            start = time.perf_counter()
            done, _ = await asyncio.wait([*inflight, waker], return_when=asyncio.FIRST_COMPLETED)
            self.stats.busy_s += time.perf_counter() - start
            waker.cancel()
            landed = []
            for fut in [f for f in inflight if f in done]:  # in sending order: a follower's step lands after its lead
                seqs = inflight.pop(fut)
                try:
                    out = fut.result()
                    self.stats.steps += 1
                    self.scheduler.update(seqs, out)
                    spans = [(len(s.output_ids) - s.new_tokens, len(s.output_ids)) for s in seqs]  # its new tokens
                except Exception as exc:  # a worker died or a step failed: fail every request, never hang
                    self._fail_all(f"{type(exc).__name__}: {exc}")
                    for other in inflight:
                        other.cancel()
                    return
                landed.append((seqs, out, spans))
            # The next step goes out before the streams wake: its submit task runs first, so the workers compute
            # while this event loop serves the consumers, instead of waiting behind them.
            self._launch(inflight)
            for seqs, out, spans in landed:
                self._deliver(seqs, out, spans)

    def _launch(self, inflight: dict[asyncio.Future[Any], list[Sequence]]) -> None:
        """Start steps while pipeline slots and ready sequences exist."""
        while len(inflight) < self.slots:
            seqs = self.scheduler.schedule(self._micro_batch(), self._prompt_share(self.max_inflight - len(inflight)))
            if not seqs:
                return
            self.stats.prompt_tokens += sum(max(0, min(s.num_cached + s.chunk, len(s.prompt_ids)) - s.num_cached)
                                            for s in seqs)
            self._first_scheduled(seqs)
            step = self.scheduler.build_step(seqs)
            inflight[asyncio.ensure_future(self._submit(step))] = seqs

    def _first_scheduled(self, seqs: list[Sequence]) -> None:
        """Observe the queue time of sequences entering their first step."""
        now = time.perf_counter()
        for seq in seqs:
            if seq.scheduled_at is None:
                seq.scheduled_at = now
                if self.metrics is not None:
                    self.metrics.queue.observe(now - seq.arrival)

    @classmethod
    def from_config(cls, grid: StepGrid, cfg: Any, eos_token_ids: tuple[int, ...] = (),
                    metrics: RequestMetrics | None = None, grammars: GrammarMatchers | None = None) -> AsyncEngine:
        """An engine over `grid` with the limits of a GridServeConfig (and its draft model, loaded here)."""
        spec, drafter = cfg.speculative_config, None
        if spec is not None and spec.method == "draft_model":
            from cluster.draft import load_draft

            tokens = min(grid.num_blocks * cfg.block_size, cfg.max_num_seqs * cfg.max_model_len)  # the target's
            drafter = load_draft(spec.model, tokens, cfg.block_size, cfg.max_model_len, cfg.torch_dtype_name)
        return cls(grid, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len,
                   eos_token_ids, step_timeout_s=cfg.step_timeout_s, prefix_caching=cfg.enable_prefix_caching,
                   metrics=metrics, grammars=grammars, speculative=spec, drafter=drafter,
                   async_scheduling=async_scheduling_on(cfg, getattr(grid, "resource", "CPU"), grid.tp * grid.pp))

    async def _submit(self, step: Any) -> StepOutput:
        """Run one step on the grid; the last stage's TP rank 0 answers (or the step times out)."""
        try:
            return await asyncio.wait_for(self.grid.step_async(step), self.step_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"a grid step took over step_timeout_s={self.step_timeout_s} s: a worker is stuck "
                               "or dead") from None

    def _deliver(self, seqs: list[Sequence], out: StepOutput, spans: list[tuple[int, int]]) -> None:
        """Hand the step's tokens (already applied to the scheduler; `spans`: each sequence's output indices it
        added, as later steps landing at once may have added more) to each live request's stream."""
        logprobs = out.logprobs or [None] * len(seqs)
        for seq, token, lp, (first, end) in zip(seqs, out.token_ids, logprobs, spans):
            if seq.pool and seq.hidden is not None and (queue := self.streams.get(seq.seq_id)) is not None:
                queue.put_nowait(TokenEvent(None, "stop"))
            if token == NO_TOKEN or seq.finish_reason == "abort":  # a prompt chunk short of its end samples nothing
                continue
            self.stats.generation_tokens += end - first
            queue = self.streams.get(seq.seq_id)
            if queue is None:
                continue
            for index in range(first, end):  # several when speculative drafts were kept
                last = index == end - 1
                final = index == len(seq.output_ids) - 1  # its finish reason rides on its very last token
                queue.put_nowait(TokenEvent(seq.output_ids[index], seq.finish_reason if final else None,
                                            logprobs=lp if last else None,
                                            cached_tokens=seq.cached_prompt_tokens if index == 0 else None))

    def fail(self, reason: str) -> None:
        """Declare the grid broken from outside (a health probe found a dead worker): fail everything queued."""
        if not self.dead:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        """End every in-flight and queued request with an error and mark the engine dead."""
        log.error("grid step failed, failing all requests: %s", reason)
        self.dead = reason
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            seq.finish("error")
            seq.in_flight = False
            self.scheduler.retire(seq)
            queue = self.streams.get(seq.seq_id)
            if queue is not None:
                queue.put_nowait(TokenEvent(None, "error", reason))
