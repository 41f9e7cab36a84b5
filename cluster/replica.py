"""One model replica: placement, the TP x PP grid, the engine, the tokenizer, and the one failure policy.

The Serve app (HTTP <-> Replica) and the batch job (JSONL <-> Replica) are adapters over this class.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster.config import GridServeConfig
from cluster.engine import AsyncEngine
from cluster.generate import collect, failed, merge_choices, text_streams
from cluster.lora import Lookup, LoraRegistry
from cluster.metrics import ReplicaMetrics, grid_flags
from cluster.migration import Resumable
from cluster.replica_contract import RETRY_AFTER_OVERLOAD_S, RETRY_AFTER_REBUILD_S, ReplicaGrid, ReplicaUnavailable
from cluster.request import ChoiceDelta, GenerationParams, RequestError, Result
from cluster.structured import GrammarMatchers
from cluster.tokenizer import load_tokenizer

if TYPE_CHECKING:  # Ray is imported only where a Ray grid is made: tests run replicas over in-process grids
    from ray.util.placement_group import PlacementGroup

# The contract's names are re-exported: the faces and tests import them from here.
__all__ = ["RETRY_AFTER_OVERLOAD_S", "RETRY_AFTER_REBUILD_S", "ROUTING_DIGESTS", "Replica", "ReplicaGrid",
           "ReplicaUnavailable"]
log = logging.getLogger("gridserve.replica")
ROUTING_DIGESTS = 16384  # most cached-block digests per routing report: bounds what Serve's controller relays


class Replica:
    """A TP x PP grid of workers with its engine: generate text, report its state, heal after a failure."""

    def __init__(self, cfg: GridServeConfig, name: str = "replica", placement_group: PlacementGroup | None = None,
                 bundle_offset: int = 0, grid_factory: Callable[[], ReplicaGrid] | None = None,
                 lora_lookup: Lookup | None = None) -> None:
        """Reserve the workers' placement group (unless given one, e.g. Serve's from `bundle_offset` on) and
        start the grid; `grid_factory` replaces the Ray grid (tests run an in-process one); `lora_lookup` finds
        adapters loaded at runtime (the Serve app's catalog)."""
        self.cfg, self.name = cfg, name
        self.spec = cfg.spec()
        self.tokenizer = load_tokenizer(cfg.model)
        self.grammars = GrammarMatchers(self.tokenizer, self.spec.vocab_size, self.spec.eos_token_ids)
        self.metrics = ReplicaMetrics(name, cfg.model_name, lambda: self.last_snapshot)
        self.pg, self.offset, self.owns_pg = placement_group, bundle_offset, False
        if grid_factory is None and self.pg is None:
            from cluster.placement import create_replica_group

            self.pg, _ = create_replica_group(cfg)
            self.owns_pg = True
        self.new_grid = grid_factory or self._ray_grid
        self.rebuilds = 0
        self.rebuild_task: asyncio.Task[None] | None = None
        try:
            self.grid = self.new_grid()
            # A max_model_len taken from the model shrinks to what this grid's KV cache holds (logged once).
            self.cfg = cfg.fit_kv_cache(self.grid.num_blocks * cfg.block_size)
        except BaseException:
            self._free_placement()
            raise
        self.engine = self._new_engine()
        self.loras = LoraRegistry(cfg.lora_modules, cfg.max_loras if cfg.enable_lora else 0, lambda: self.grid,
                                  lora_lookup, cfg.model_name)
        self.resumable = Resumable(lambda: self.engine, self.ready, cfg.migration_timeout_s)
        self.last_snapshot = self._status([])

    def _ray_grid(self) -> ReplicaGrid:
        """Workers in this replica's placement group, from bundle `offset` on."""
        from cluster.grid import WorkerGrid

        assert self.pg is not None, "a replica without a grid factory made its placement group in __init__"
        grid = WorkerGrid(self.cfg, placement_group=self.pg, bundle_offset=self.offset)
        placed = (f"stage {w['pp_rank']} rank {w['tp_rank']} on {w['ip']} pid {w['pid']}" for w in grid.where)
        log.info("replica %s: %s", self.name, ", ".join(placed))
        return grid

    def _new_engine(self) -> AsyncEngine:
        return AsyncEngine.from_config(self.grid, self.cfg, self.spec.eos_token_ids, self.metrics.requests,
                                       self.grammars)

    # -- requests -----------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: GenerationParams) -> AsyncGenerator[list[ChoiceDelta], None]:
        """Queue the request's n choices now; their deltas, batched per wake-up (closing it aborts them). A
        choice whose grid fails continues on the rebuilt one (`cluster.migration`). RequestError if it can never
        be served, ReplicaUnavailable if not now (grid rebuilding, queue full)."""
        max_tokens = params.check(prompt_ids, self.engine.limits(self.spec.vocab_size))
        self.check_available()

        def run(p: GenerationParams) -> AsyncGenerator[list[ChoiceDelta], None]:
            return merge_choices(text_streams(lambda i: self.resumable.open(prompt_ids, p, i, max_tokens),
                                              self.tokenizer, p))
        return self.loras.stream(params, run)  # the request's LoRA adapter pinned, when it names one

    async def complete(self, request_id: Any, prompt_ids: list[int], params: GenerationParams) -> Result:
        """Generate the first choice to the end; a request refused now or for good becomes a failed Result."""
        try:
            chunks = self.generate(prompt_ids, params.model_copy(update={"n": 1}))
        except (RequestError, ReplicaUnavailable) as exc:
            return failed(request_id, prompt_ids, str(exc))
        return (await collect(chunks))[0].result(request_id, prompt_ids)

    async def embed(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """The final hidden state of each prompt's last token (float32 [hidden], not normalized), computed together
        in the running batch. RequestError for a prompt that can never be served, ReplicaUnavailable if not now;
        a grid that fails meanwhile is waited for (up to `migration_timeout_s`) and the prompts computed again."""
        limits = self.engine.limits(self.spec.vocab_size)
        longest = min(limits.max_model_len, limits.kv_tokens)
        for i, ids in enumerate(prompts):
            if not ids:
                raise RequestError(f"input {i} is empty; send at least one token", "input")
            if len(ids) > longest:
                raise RequestError(f"input {i} has {len(ids)} tokens; this model embeds at most {longest}: "
                                   "shorten it", "input")
            bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise RequestError(f"input {i} has token ids outside [0, {self.spec.vocab_size}): {bad[:5]}", "input")
        self.check_available()
        deadline = asyncio.get_running_loop().time() + self.cfg.migration_timeout_s
        while True:
            engine = self.engine
            try:
                return list(await asyncio.gather(*(engine.embed(ids) for ids in prompts)))
            except RuntimeError as exc:
                if not engine.dead:
                    raise
                if asyncio.get_running_loop().time() > deadline or not await self.ready():
                    raise ReplicaUnavailable(f"this replica's grid failed ({exc}); retry",
                                             RETRY_AFTER_REBUILD_S, rebuilding=True) from None

    def check_alive(self) -> None:
        """Raise ReplicaUnavailable (and start the rebuild) if the grid failed."""
        if self.engine.dead:
            self.heal()
            raise ReplicaUnavailable(f"this replica's grid failed ({self.engine.dead}) and is being rebuilt; "
                                     "retry", RETRY_AFTER_REBUILD_S, rebuilding=True)

    def check_available(self) -> None:
        """Raise ReplicaUnavailable unless new work can be queued now."""
        self.check_alive()
        if self.engine.num_waiting >= self.cfg.max_waiting_requests:
            raise ReplicaUnavailable(f"server overloaded: {self.engine.num_waiting} requests queued; retry "
                                     "shortly", RETRY_AFTER_OVERLOAD_S)

    # -- failure policy -----------------------------------------------------------------------------------------
    def heal(self) -> None:
        """The one failure policy. The engine has already failed every in-flight request (a step over
        `step_timeout_s` or a dead worker); here the grid is rebuilt, once at a time, in the same placement
        group. Call from the event loop; `failure()` reports a rebuild that itself failed."""
        if self.engine.dead and (self.rebuild_task is None or self.rebuild_task.done()):
            self.rebuild_task = asyncio.get_running_loop().create_task(self._rebuild())

    async def _rebuild(self) -> None:
        """Kill the broken grid and start a fresh one (requests meanwhile get ReplicaUnavailable); off the nodes
        found unreachable, when this replica owns its placement group."""
        log.warning("replica %s: grid failed (%s); rebuilding it", self.name, self.engine.dead)
        try:
            gone = await asyncio.to_thread(self._unreachable)
            await asyncio.to_thread(self.grid.shutdown)
            if gone and self.owns_pg:
                await asyncio.to_thread(self._replace_placement, gone)
            self.grid = await asyncio.to_thread(self.new_grid)
            await self.loras.restore()  # the resident adapters, in the same slots, before any request resumes
        except BaseException as exc:
            log.error("replica %s: grid rebuild failed: %s: %s", self.name, type(exc).__name__, exc)
            raise
        self.engine = self._new_engine()
        self.rebuilds += 1
        log.warning("replica %s: grid rebuilt (%d so far)", self.name, self.rebuilds)

    def _unreachable(self) -> frozenset[str]:
        """Ids of the failed grid's nodes that do not answer now (a host killed or cut off); none for grids
        that are not placed by Ray."""
        where = getattr(self.grid, "where", None)
        if not where:
            return frozenset()
        from cluster.grid import unreachable_nodes

        gone = frozenset(unreachable_nodes({w["node_id"] for w in where}))
        if gone:
            log.warning("replica %s: nodes %s do not answer; %s", self.name,
                        ", ".join(sorted({w["ip"] for w in where if w["node_id"] in gone})),
                        "the grid is rebuilt off them" if self.owns_pg else
                        "the grid is rebuilt in its placement group once Ray moves their bundles")
        return gone

    def _replace_placement(self, avoid: frozenset[str]) -> None:
        """Free this replica's placement group and reserve a new one off the `avoid` nodes (Ray keeps a bundle on
        a lost node until it declares that node dead, much later)."""
        from cluster.placement import create_replica_group

        self._free_placement()
        self.pg, _ = create_replica_group(self.cfg, avoid)

    def failure(self) -> str | None:
        """Why this replica cannot recover by itself (its last rebuild failed), or None."""
        task = self.rebuild_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            return f"grid rebuild failed: {task.exception()}"
        return None

    async def ready(self) -> bool:
        """Heal a failed grid (unless its rebuild already failed) and wait for it; True if the grid serves now."""
        if self.engine.dead and self.failure() is None:
            self.heal()
        if self.rebuild_task is not None:
            await asyncio.wait([self.rebuild_task])
        return not self.engine.dead

    # -- state --------------------------------------------------------------------------------------------------
    def _status(self, workers: list[dict[str, Any]]) -> dict[str, Any]:
        """Engine counters and the given per-worker stats, with balance flags."""
        e, sched = self.engine, self.engine.scheduler
        engine = {"requests_running": e.num_running, "requests_waiting": e.num_waiting,
                  "kv_cache_usage": sched.blocks.usage, "kv_cache_blocks": sched.blocks.num_blocks,
                  "preemptions_total": sched.num_preemptions, "prefix_cache_hit_tokens_total": sched.prefix_hit_tokens,
                  "prefix_cache_queried_tokens_total": sched.admitted_tokens, "steps_total": e.stats.steps,
                  "prompt_tokens_total": e.stats.prompt_tokens, "generation_tokens_total": e.stats.generation_tokens,
                  "spec_decode_draft_tokens_total": sched.draft_tokens,
                  "spec_decode_accepted_tokens_total": sched.accepted_tokens}
        return {"replica": self.name, "pid": os.getpid(), "tp": self.cfg.tensor_parallel_size,
                "pp": self.cfg.pipeline_parallel_size, "rebuilds": self.rebuilds, "dead": e.dead, "engine": engine,
                "workers": workers, "flags": grid_flags(workers)}

    async def snapshot(self) -> dict[str, Any]:
        """What /status, /metrics and `gridserve status` show; probing the workers finds a dead one even while
        idle (then the grid is failed, healed, and ReplicaUnavailable raised). A failed grid is healed here too:
        Serve's health check calls this even when no request comes."""
        if self.engine.dead:
            self.heal()
        try:
            workers = [] if self.engine.dead else await asyncio.to_thread(self.grid.worker_stats)
        except TimeoutError:  # alive but slow to answer (a starved host): keep its last figures, fail nothing
            workers = self.last_snapshot["workers"]
        except Exception as exc:  # a Ray error from a dead or unreachable worker
            self.engine.fail(f"worker unreachable: {type(exc).__name__}")
            self.heal()
            raise ReplicaUnavailable("a worker of this replica's grid died; rebuilding it",
                                     RETRY_AFTER_REBUILD_S, rebuilding=True) from None
        self.last_snapshot = self._status(workers)
        return self.last_snapshot

    async def metrics_text(self) -> bytes:
        """Prometheus text of this replica, from a fresh snapshot."""
        await self.snapshot()
        return self.metrics.text()

    def load(self) -> dict[str, float]:
        """Load as LLM work, for the autoscaling policy."""
        e = self.engine
        return {"pending_tokens": float(e.pending_tokens()), "kv_cache_usage": float(e.scheduler.blocks.usage),
                "running": float(e.num_running), "waiting": float(e.num_waiting)}

    def routing_stats(self) -> dict[str, Any]:
        """What a prefix-aware router needs: digests of the KV blocks this replica can reuse, its queue, and the
        LoRA adapters it holds."""
        blocks = self.engine.scheduler.blocks
        return {"block_size": blocks.block_size, "digests": blocks.digests(ROUTING_DIGESTS),
                "running": self.engine.num_running, "waiting": self.engine.num_waiting, "loras": self.loras.resident()}

    # -- teardown -----------------------------------------------------------------------------------------------
    def close_dag(self) -> None:
        """Release the grid's step machinery; call from the event loop that ran it, before it ends."""
        self.grid.close_dag()

    def shutdown(self) -> None:
        """Stop the workers and free the placement group this replica reserved (never Serve's)."""
        self.grid.shutdown()
        self._free_placement()

    def _free_placement(self) -> None:
        if self.owns_pg and self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
        self.pg = None
