"""The model deployment: one `cluster.replica.Replica` per Serve replica, called by the ingress through a handle.

It speaks token ids, not HTTP, so Serve's request router sees each prompt (`deployments.prefix_router`), and
every answer a replica can refuse comes back as a `Refusal` value rather than an exception through Ray.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.util import get_current_placement_group

from actors.shard.host_memory import freeze_startup_heap
from actors.shard.niceness import set_nice
from cluster.config import GridServeConfig
from cluster.engine import AsyncEngine
from cluster.replica import RETRY_AFTER_REBUILD_S, Replica, ReplicaUnavailable
from cluster.request import ChoiceDelta, GenerationParams, RequestError
from deployments.lora_api import catalog_lookup
from deployments.mailbox import END, Inbox, Mailed, Outboxes
from deployments.metrics_board import board
from deployments.ray_metrics import RayMetrics
from deployments.remote_stream import Refusal

log = logging.getLogger("gridserve.serve")
STALL_STEP_TIMEOUTS = 2  # an engine with work that took no step in this many step timeouts has a stalled loop


class LoopWatch:
    """Whether an engine's step loop still makes progress while requests wait on it (a crashed or wedged loop
    fails no request by itself: they would hang)."""

    def __init__(self) -> None:
        self.steps, self.since = -1, time.monotonic()

    def stalled(self, engine: AsyncEngine, limit_s: float) -> str | None:
        """Why the loop counts as stalled now, or None (it stepped since the last look, or has nothing to do)."""
        pending = engine.num_running + engine.num_waiting
        if pending == 0 or engine.stats.steps != self.steps or engine.dead:
            self.steps, self.since = engine.stats.steps, time.monotonic()
            return None
        idle = time.monotonic() - self.since
        if idle <= limit_s:
            return None
        return f"the engine loop took no step in {idle:.0f} s with {pending} requests on it"


async def guarded(call: Awaitable[Any]) -> Any:
    """`call`'s value, or a Refusal if the replica cannot answer now (grid being rebuilt)."""
    try:
        return await call
    except ReplicaUnavailable as exc:
        return Refusal.of(exc)


@serve.deployment
class LLMServer:
    """Token ids in, coalesced text deltas out. The workers are actors this replica actor owns: Ray ends them
    with it."""

    def __init__(self, args: dict[str, Any], hand_back: bool = True) -> None:
        """`hand_back`: a failed grid's choices end at once for the caller to continue elsewhere (the ingress over
        a handle does); False keeps them waiting for this replica's rebuild (colocated: no other replica to ask)."""
        cfg = GridServeConfig.from_args(args)
        if cfg.serve_nice is not None:
            set_nice(cfg.serve_nice, "serve_nice")
        context = serve.get_replica_context()
        tag, self.board = context.replica_tag, board(context.app_name)
        pg = get_current_placement_group()  # Serve's group: bundle 0 is this actor, 1.. the workers
        lookup = catalog_lookup(context.app_name) if cfg.allow_runtime_lora_updating else None
        self.replica = Replica(cfg, tag, pg, bundle_offset=1 if pg is not None else 0, lora_lookup=lookup)
        self.replica.resumable.hand_back = hand_back  # the ingress moves them (ChunkStream._migrate)
        self.watch = LoopWatch()
        self.outboxes = Outboxes()
        self.ray_metrics = RayMetrics()
        freeze_startup_heap()

    async def generate(self, prompt_ids: list[int], params: GenerationParams, inbox: Inbox | None = None
                       ) -> AsyncIterator[list[ChoiceDelta] | Refusal | Mailed]:
        """First a Refusal, or the acceptance (the ingress may start its answer): `Mailed` when the choices'
        deltas go to the ingress's mailbox (`inbox`, on this host), else an empty list and the deltas on this
        stream, batched per wake-up. Either way the call ends when the generation does."""
        try:
            if params.lora is not None:  # an unknown adapter is refused here (404), before the answer starts
                await self.replica.loras.resolve(params.lora)
            chunks = self.replica.generate(prompt_ids, params)
        except (RequestError, ReplicaUnavailable) as exc:
            yield Refusal.of(exc)
            return
        outbox = await self.outboxes.get(inbox)
        yield [] if outbox is None else Mailed()
        async with aclosing(chunks):  # Serve cancelling this generator aborts the choices at once
            if outbox is None or inbox is None:
                async for chunk in chunks:
                    yield chunk
                return
            async for chunk in chunks:
                outbox.put(inbox.key, chunk)
            outbox.put(inbox.key, END)
            await outbox.drain()  # written before the call ends: the ingress reads END after whatever came first

    async def embed(self, prompts: list[list[int]]) -> list[np.ndarray] | Refusal:
        """Each prompt's last-token final hidden state (`Replica.embed`), or the Refusal."""
        try:
            return await self.replica.embed(prompts)
        except (RequestError, ReplicaUnavailable) as exc:
            return Refusal.of(exc)

    async def info(self) -> dict[str, Any]:
        """What the ingress tells clients about the model (max_model_len as fitted to this grid's KV cache)."""
        cfg = self.replica.cfg
        return {"max_model_len": cfg.max_model_len, "vocab_size": self.replica.spec.vocab_size,
                "hidden_size": self.replica.spec.hidden_size}

    async def health(self) -> Refusal | None:
        """None if the grid serves and its engine loop steps; a Refusal (and a rebuild started) if not. Reads
        counters only: it never waits behind a step."""
        try:
            self._check_loop()
            self.replica.check_alive()
        except ReplicaUnavailable as exc:
            return Refusal.of(exc)
        return None

    def _check_loop(self) -> None:
        """A stalled engine loop fails its grid: the requests on it migrate to the rebuilt one."""
        cfg = self.replica.cfg
        if (why := self.watch.stalled(self.replica.engine, STALL_STEP_TIMEOUTS * cfg.step_timeout_s)) is not None:
            log.error("replica %s: %s; failing its grid", self.replica.name, why)
            self.replica.engine.fail(why)
            self.replica.heal()
            raise ReplicaUnavailable(f"{why}; the grid is being rebuilt", RETRY_AFTER_REBUILD_S, rebuilding=True)

    async def status(self) -> dict[str, Any] | Refusal:
        """The replica's grid and engine state (GET /status), and how many ingresses it mails deltas to."""
        snapshot = await guarded(self.replica.snapshot())
        if isinstance(snapshot, dict):
            snapshot["mailbox_connections"] = self.outboxes.connected()
        return snapshot

    async def metrics_text(self) -> bytes | Refusal:
        """Prometheus text of this replica as of now, also posted to the app's board (GET /metrics then merges
        it with the other replicas' last posts)."""
        text = await guarded(self.replica.metrics_text())
        if not isinstance(text, Refusal):
            await self._post_metrics(text)
        return text

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Load as LLM work, for deployments.autoscaling.TokenLoadPolicy."""
        return self.replica.load()

    async def record_routing_stats(self) -> dict[str, Any]:
        """Cached-block digests and queue, for deployments.prefix_router.PrefixAwareRouter."""
        return self.replica.routing_stats()

    async def check_health(self) -> None:
        """Serve's periodic health check: probe the grid (a dead worker starts a rebuild), refresh Ray's gauges;
        a failed rebuild fails the check and Serve replaces this replica."""
        if (failure := self.replica.failure()) is not None:
            raise RuntimeError(failure)
        try:
            self._check_loop()
            snapshot = await self.replica.snapshot()
        except ReplicaUnavailable:
            return  # being rebuilt: healthy unless the rebuild fails
        try:
            self.ray_metrics.update(snapshot)
            await self._post_metrics(self.replica.metrics.text())
        except Exception:  # metrics must never fail the health check
            log.exception("could not export metrics")

    async def _post_metrics(self, text: bytes) -> None:
        """Put this replica's Prometheus text on the app's board (what /metrics answers from)."""
        try:
            await self.board.post.remote(self.replica.name, text)
        except RayActorError:  # the board went with the process that made it: make a new one
            self.board = board(serve.get_replica_context().app_name)
            await self.board.post.remote(self.replica.name, text)

    def __del__(self) -> None:
        """Serve is shutting this replica down: take it off the board now rather than when it goes stale."""
        try:
            self.board.drop.remote(self.replica.name)
        except Exception:  # the board or Ray may already be gone; the entry then expires
            pass
