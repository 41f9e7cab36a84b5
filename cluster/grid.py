"""One replica: tp x pp worker actors in one placement group, driven one step at a time."""
from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.shard import channel as step_channel
from actors.shard.runner import ShardPlan, StepInput, StepOutput
from actors.worker import Worker
from cluster.channel import StepChannel
from cluster.config import GridServeConfig
from cluster.placement import Layout, worker_threads

log = logging.getLogger("gridserve")

# Steps smaller than this travel inside each actor call (Ray inlines arguments under 100 KiB): a ray.put through
# the object store adds a round trip to every small decode step (BENCHMARKS.md, "Step dispatch and collectives").
INLINE_STEP_BYTES = 64 * 1024
# A raylet that does not take a TCP connection within this is treated as gone (its host died or is cut off). Ray
# itself declares a node dead only after many missed health checks; a rebuilt grid must not wait for that.
NODE_PROBE_S = 2.0


def wire_bytes(step: StepInput) -> int:
    """Generous estimate of a step's pickled size: arrays, block tables, penalty histories, sampling params."""
    ints = sum(len(t) for t in step.block_tables) + len(step.query_lens) * 3
    ints += sum(len(h[0]) + len(h[1]) for h in step.histories or [] if h is not None)
    masks = step.allowed[1].nbytes + 8 * len(step.allowed[0]) if step.allowed is not None else 0
    return 1024 + step.token_ids.nbytes + step.positions.nbytes + 8 * ints + 512 * len(step.sampling) + masks


class WorkerGrid:
    """The TP x PP actors of one model replica; stage k's outputs feed stage k+1 as object refs."""

    def __init__(self, cfg: GridServeConfig, placement_group: PlacementGroup, bundle_offset: int = 0,
                 owns_group: bool = False) -> None:
        """Start the workers in `placement_group`'s bundles from `bundle_offset` on (made by `cluster.placement`;
        removed at shutdown if `owns_group`)."""
        self.cfg = cfg
        self.tp, self.pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
        self.owns_pg = owns_group
        self.pg: PlacementGroup | None = placement_group
        self.offset = bundle_offset
        self.stages: list[list[Any]] = []
        self.dag: Any = None  # compiled on the first async step, inside the caller's event loop
        self.dag_loop: asyncio.AbstractEventLoop | None = None
        self.channel: StepChannel | None = None
        self.serving: list[ray.ObjectRef[Any]] = []
        try:
            self.layout = Layout.of(cfg, "GPU" if placement_group.bundle_specs[bundle_offset].get("GPU") else "CPU")
            self.resource = self.layout.resource
            self._start_workers()
            timeout = self.cfg.placement_timeout_s
            self.where = ray.get([w.where.remote() for stage in self.stages for w in stage], timeout=timeout)
            # Compiled-graph channels only with every worker on one node (Ray's channels across nodes are not used).
            self.use_compiled = self.cfg.compiled_graph and len({w["node_id"] for w in self.where}) == 1
            wants_channel = not self.use_compiled and self._channel_fits()
            # Load on the thread that will run the steps: each thread that runs parallel torch ops keeps its own
            # OpenMP pool for life, and with two pools per process libgomp stops spinning between ops, which slows a
            # multi-threaded CPU step. The channel is served from the "channel" group's thread.
            self.num_blocks = self._load("channel" if wants_channel else None)
            self._check_tp_groups_packed()
            if wants_channel:
                self.channel = self._open_channel()
        except BaseException:
            self.shutdown()
            raise

    def _start_workers(self) -> None:
        """One actor per worker, stage-major, in its stage's bundle (or its own, when TP may span nodes)."""
        threads = worker_threads(self.resource, self.cfg.cpus_per_worker)
        partition = self.cfg.layer_partition()  # reads the model's config.json: once, not per worker
        assert self.cfg.max_model_len is not None, "GridServeConfig's validator fills max_model_len"
        assert self.pg is not None, "the placement group is only dropped at shutdown"
        for pp_rank in range(self.pp):
            stage = []
            for tp_rank in range(self.tp):
                plan = ShardPlan(self.cfg.model, tp_rank, self.tp, pp_rank, self.pp, self.cfg.torch_dtype_name,
                                 self.cfg.max_model_len, self.cfg.block_size, partition, self.cfg.cpu_weights,
                                 self.cfg.max_loras if self.cfg.enable_lora else 0, self.cfg.max_lora_rank)
                index = self.offset + self.layout.bundle_index(pp_rank, tp_rank)
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index)
                # @ray.remote gives the class `options`; mypy sees the undecorated class
                stage.append(Worker.options(  # type: ignore[attr-defined]
                    scheduling_strategy=strategy, **self.layout.worker_options()).remote(
                    plan, self.cfg.device, threads, self.cfg.seed, self.cfg.worker_nice))
            self.stages.append(stage)

    def _load(self, group: str | None) -> int:
        """Rendezvous each stage, load every shard in parallel, size and allocate the KV cache.

        `group` is the worker concurrency group whose thread runs the loading (None: the default thread).
        """
        timeout = self.cfg.placement_timeout_s
        loads = []
        for pp_rank, stage in enumerate(self.stages):
            master = self.where[pp_rank * self.tp]["ip"]
            port = ray.get(stage[0].open_rendezvous.remote()) if self.tp > 1 else 0
            shm = self._shm_path(pp_rank)
            loads += [w.load.options(concurrency_group=group).remote(master, port, timeout, shm, self._slot_bytes())
                      for w in stage]
        self.reports = ray.get(loads)
        budgets = ray.get([w.cache_budget.remote(self.cfg.kv_cache_memory_bytes, self.cfg.gpu_memory_utilization)
                           for stage in self.stages for w in stage])
        num_blocks = int(min(b // r["block_bytes"] for b, r in zip(budgets, self.reports)))
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache after loading weights; raise kv_cache_memory_bytes "
                             "or gpu_memory_utilization, or spread the model over more workers")
        # What a full batch of the longest sequences can hold comes in now; the rest (prefix-cache room) on use.
        assert self.cfg.max_model_len is not None, "GridServeConfig's validator fills max_model_len"
        full_batch = -(-self.cfg.max_num_seqs * self.cfg.max_model_len // self.cfg.block_size)
        faulted = ray.get([w.allocate_cache.options(concurrency_group=group).remote(num_blocks, full_batch)
                           for stage in self.stages for w in stage])
        log.info("grid tp=%d pp=%d ready: %d KV blocks of %d tokens (%s), weights %.1f MiB per worker (max); CPU "
                 "matmuls by tokens per step: %s", self.tp, self.pp, num_blocks, self.cfg.block_size,
                 "none faulted in: CUDA memory, or no MADV_POPULATE_WRITE" if None in faulted else
                 f"{min(num_blocks, full_batch)} faulted in, {max(faulted):.1f} s",
                 max(r["weight_bytes"] for r in self.reports) / 2**20,
                 "; ".join(sorted({r.get("matmul") or "fixed" for r in self.reports})))
        return num_blocks

    def _shm_path(self, pp_rank: int) -> str | None:
        """A fresh /dev/shm name for a stage whose CPU TP ranks share a host (None: use the process group)."""
        group = self.where[pp_rank * self.tp:(pp_rank + 1) * self.tp]
        if not self.cfg.shm_allreduce or self.tp == 1 or len({w["node_id"] for w in group}) > 1:
            return None
        return f"/dev/shm/gridserve-{uuid.uuid4().hex[:16]}-stage{pp_rank}"

    def _slot_bytes(self) -> int:
        """Largest collective of a step: a full prefill chunk's hidden states, or the batch's logit shards."""
        spec = self.cfg.spec()
        assert self.cfg.max_num_batched_tokens is not None, "GridServeConfig's validator fills it"
        rows = -(-spec.vocab_size // self.tp)
        return 4 * max(self.cfg.max_num_batched_tokens * spec.hidden_size, self.cfg.max_num_seqs * rows)

    def _channel_fits(self) -> bool:
        """Whether steps may go over the direct socket channel (every worker on the driver's host), per config."""
        if self.cfg.step_channel == "ray":
            return False
        here = ray.get_runtime_context().get_node_id()
        off_node = sorted({w["node_id"][:8] for w in self.where if w["node_id"] != here})
        why = ("it needs Linux" if not step_channel.supported() else
               f"workers run on other nodes ({', '.join(off_node)}) than this driver" if off_node else None)
        if why and self.cfg.step_channel == "socket":
            raise ValueError(f"step_channel='socket' cannot be used: {why}; set step_channel to 'auto' or 'ray'")
        if why:
            log.info("steps go through Ray actor calls: the socket channel is off because %s", why)
        return why is None

    def _open_channel(self) -> StepChannel:
        """Every worker listens; stage k rank i connects to stage k+1 rank i; then this driver connects to all."""
        timeout = self.cfg.placement_timeout_s
        ends = ray.get([w.open_channel.remote(timeout) for stage in self.stages for w in stage], timeout=timeout)
        links = [self.stages[k][i].connect_channel.remote(*ends[(k + 1) * self.tp + i], timeout)
                 for k in range(self.pp - 1) for i in range(self.tp)]
        ray.get(links, timeout=timeout)
        # Each worker's serving call runs until the channel closes (kept for the grid's life; nothing awaits it).
        self.serving = [w.serve_channel.remote(timeout) for stage in self.stages for w in stage]
        return StepChannel(ends, reply_index=(self.pp - 1) * self.tp, timeout_s=timeout)

    def _check_tp_groups_packed(self) -> None:
        """Refuse a layout where a TP group straddles nodes unless the user asked for it."""
        if self.cfg.allow_tp_across_nodes:
            return
        for pp_rank in range(self.pp):
            nodes = {w["node_id"] for w in self.where[pp_rank * self.tp:(pp_rank + 1) * self.tp]}
            if len(nodes) > 1:
                raise ValueError(f"stage {pp_rank}'s TP group landed on {len(nodes)} nodes; a TP group must sit on "
                                 "one node (set placement strategy STRICT_PACK, lower tensor_parallel_size, or set "
                                 "allow_tp_across_nodes=true)")

    def submit(self, step: StepInput) -> list[ray.ObjectRef[Any]]:
        """Launch one step through every stage; returns the last stage's refs (rank 0 holds the tokens)."""
        # A big step is put once and read by every worker; a small one is cheaper inline in each call.
        step_ref = step if wire_bytes(step) < INLINE_STEP_BYTES else ray.put(step)
        hidden: list[Any] = [None] * self.tp
        for stage in self.stages:
            # Rank i of stage k feeds rank i of stage k+1: the refs go actor to actor, not via the driver.
            hidden = [w.execute.remote(step_ref, h) for w, h in zip(stage, hidden)]
        return hidden

    async def step_async(self, step: StepInput) -> StepOutput:
        """Run one step from an event loop: over the socket channel, the compiled graph, or plain actor calls."""
        if self.channel is not None:
            return await self.channel.step(step)
        if not self.use_compiled:
            out: StepOutput = await self.submit(step)[0]
            return out
        loop = asyncio.get_running_loop()
        if self.dag is not None and self.dag_loop is not loop:
            self.close_dag()  # its channel readers live on a loop that is gone; rebuild on this one
        if self.dag is None:
            self.dag, self.dag_loop = self._compile(), loop
        refs = await self.dag.execute_async(step)
        outs: list[StepOutput] = [await ref for ref in refs]  # every output channel must be drained before reuse
        return outs[0]

    def close_dag(self) -> None:
        """Tear the compiled graph down; call it from the event loop that ran it, before that loop ends."""
        if self.dag is not None:
            try:
                self.dag.teardown()
            except Exception:  # a dead actor makes teardown raise; nothing is left to release then
                pass
            self.dag, self.dag_loop = None, None

    def _compile(self) -> Any:
        """The step as a Ray Compiled Graph: input -> stage 0 TP group -> ... -> last stage (rank i feeds rank i)."""
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as step:
            hidden: list[Any] = [None] * self.tp
            for stage in self.stages:
                hidden = [w.execute.bind(step, h) for w, h in zip(stage, hidden)]
            dag = MultiOutputNode(hidden)
        return dag.experimental_compile(enable_asyncio=True)

    def execute(self, step: StepInput) -> StepOutput:
        """Run one step and return the sampled tokens."""
        out = ray.get(self.submit(step))[0]
        assert isinstance(out, StepOutput)
        return out

    async def load_lora(self, slot: int, name: str, path: str) -> None:
        """Put a PEFT adapter into `slot` on every worker; ValueError naming it if the workers refuse it."""
        await self._on_every_worker([w.load_lora.remote(slot, name, path) for s in self.stages for w in s])

    async def unload_lora(self, slot: int) -> None:
        """Empty adapter slot `slot` on every worker."""
        await self._on_every_worker([w.unload_lora.remote(slot) for s in self.stages for w in s])

    @staticmethod
    async def _on_every_worker(refs: list[ray.ObjectRef[Any]]) -> None:
        """Wait for every call; a ValueError one raised comes back as itself, without Ray's traceback."""
        try:
            await asyncio.gather(*refs)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ValueError):
                raise ValueError(str(exc.cause)) from None
            raise

    def worker_stats(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Each worker's place, memory and recent utilization, stage-major."""
        return ray.get([w.stats.remote() for stage in self.stages for w in stage], timeout=timeout_s)

    def layout_table(self) -> list[dict[str, Any]]:
        """Where each worker ended up: stage, TP rank, node, devices, weight bytes."""
        return [{**w, "weight_bytes": r["weight_bytes"]} for w, r in zip(self.where, self.reports)]

    def shutdown(self) -> None:
        """Leave process groups, kill the actors and free the placement group."""
        workers = [w for stage in self.stages for w in stage]
        self.close_dag()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        try:
            ray.get([w.shutdown.remote() for w in workers], timeout=10)
        except Exception:  # a dead or stuck worker must not block teardown
            pass
        for w in workers:
            ray.kill(w)
        self.stages = []
        if self.pg is not None and self.owns_pg:
            remove_placement_group(self.pg)
        self.pg = None


def unreachable_nodes(node_ids: set[str], timeout_s: float = NODE_PROBE_S) -> set[str]:
    """Those of `node_ids` whose raylet is dead in Ray's table or does not take a TCP connection now (its host
    was killed or partitioned): a grid rebuilt after a failure must be placed off them."""
    table = {n["NodeID"]: n for n in ray.nodes() if n["NodeID"] in node_ids}

    def gone(node_id: str) -> bool:
        node = table.get(node_id)
        if node is None or not node.get("Alive"):
            return True
        try:
            socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), timeout_s).close()
        except OSError:  # refused (nothing listens: the host's processes died) or timed out (cut off)
            return True
        return False

    ids = sorted(node_ids)
    if not ids:
        return set()
    with ThreadPoolExecutor(len(ids)) as pool:
        return {n for n, dead in zip(ids, pool.map(gone, ids)) if dead}
