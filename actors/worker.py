"""The Ray actor that owns one GPU (or CPU slot) of the grid: the only Ray code under actors/."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from actors.comm_timer import tp_group
from actors.shard import host_memory, matmul_plan, native
from actors.shard.channel import StepServer
from actors.shard.niceness import set_nice
from actors.shard.runner import ShardPlan, StageRunner, StepInput, StepOutput
from actors.shard.sampler import Sampler
from actors.shard.shm import ShmGroup
from actors.shard.shm import supported as shm_supported
from actors.shard.step_threads import StepThreads
from actors.shard.tp import TPGroup
from actors.shard.usage import StepWindow, memory_bytes

log = logging.getLogger("gridserve.worker")


# stats answer from their own thread, even in a long step; the step channel is served from a Ray thread of its own
@ray.remote(concurrency_groups={"probe": 1, "channel": 1})  # type: ignore[call-overload]  # ray's overloads omit it
class Worker:
    """One (pp_rank, tp_rank) shard: joins its stage's process group, loads its slices, runs steps."""

    def __init__(self, plan: ShardPlan, device: str, num_threads: int, seed: int = 0, nice: int | None = None) -> None:
        if nice is not None:  # each step is what requests wait on: Ray's 15 puts it behind every other process
            set_nice(nice, "worker_nice")
        self.plan = plan
        self.seed = seed  # GridServeConfig.seed: the sampler's generator for requests without their own seed
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        torch.set_num_threads(num_threads)
        self.step_threads = StepThreads(num_threads) if num_threads > 1 and not use_cuda else None
        self.runner: StageRunner | None = None
        self.window = StepWindow()
        self.listener: socket.socket | None = None  # rank 0's rendezvous socket until `load` hands it on
        self.channel: StepServer | None = None  # the direct step channel, once the grid opens one
        self.torch_threads: set[int] = set()  # Python threads that ran this shard's torch work (1 is the goal)

    def where(self) -> dict[str, Any]:
        """Node, address and devices of this worker (for the layout report and rendezvous)."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.device),
                "pp_rank": self.plan.pp_rank, "tp_rank": self.plan.tp_rank}

    def open_rendezvous(self) -> int:
        """Listen for the stage's TP rendezvous on this node's IP only (rank 0); returns the port.

        torch's own TCPStore would listen on every interface; this socket is handed to it in `load`, and holding
        it from now on means no other process can take the port in between.
        """
        self.listener = socket.create_server((ray.util.get_node_ip_address(), 0), backlog=128)
        return int(self.listener.getsockname()[1])

    def load(self, master: str, port: int, timeout_s: float, shm_path: str | None = None,
             slot_bytes: int = 0) -> dict[str, Any]:
        """Join the stage's TP process group, build and load this shard; report its memory needs.

        With `shm_path` (every rank of the stage on this host, CPU), collectives go through shared memory. The
        grid calls this on the thread that will run the steps (the "channel" group's when it serves the channel).
        """
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # CUDA's current device is per thread
        self.torch_threads.add(threading.get_ident())
        tp = TPGroup.single()
        if self.plan.tp_size > 1:
            if master.startswith("127."):
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback-only clusters (tests)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            listener, self.listener = self.listener, None  # the store owns the socket now
            store = dist.TCPStore(master, port, self.plan.tp_size, listener is not None, timedelta(seconds=timeout_s),
                                  master_listen_fd=listener.detach() if listener is not None else None)
            dist.init_process_group(backend, store=store, rank=self.plan.tp_rank, world_size=self.plan.tp_size,
                                    timeout=timedelta(seconds=timeout_s))
            shm = None
            if shm_path is not None and self.device.type == "cpu" and shm_supported():
                shm = self._open_shm(shm_path, slot_bytes, timeout_s)
            tp = tp_group(self.plan.tp_rank, self.plan.tp_size, dist.group.WORLD, shm, self.device)
        self.runner = StageRunner(self.plan, tp, self.device)
        self.runner.sampler = Sampler(self.seed)
        if self.device.type == "cpu":
            host_memory.keep_step_buffers()  # after loading: the loader's temporaries go back to the kernel first
            native.available()  # loads (or, without an install-time build, compiles) the kernels now, not in a step
        host_memory.freeze_startup_heap()
        return {"weight_bytes": self.runner.weight_bytes(), "block_bytes": self.runner.block_bytes(),
                "load_s": self.runner.load_seconds, "matmul": matmul_plan.describe(self.runner.matmul_plans) or None}

    def _open_shm(self, path: str, slot_bytes: int, timeout_s: float) -> ShmGroup:
        """Rank 0 creates the segment, the others map it, then its name is removed (nothing left on a crash)."""
        rank = self.plan.tp_rank
        shm = ShmGroup(path, rank, self.plan.tp_size, slot_bytes, timeout_s, create=True) if rank == 0 else None
        dist.barrier()
        shm = shm or ShmGroup(path, rank, self.plan.tp_size, slot_bytes, timeout_s, create=False)
        dist.barrier()
        if rank == 0:
            os.unlink(path)
        return shm

    def cache_budget(self, cpu_bytes: int, gpu_utilization: float) -> int:
        """Bytes this worker can give the KV cache: the CPU budget (within host memory), a share of free CUDA memory."""
        if self.device.type != "cuda":
            return host_memory.cpu_cache_budget(cpu_bytes)
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        return max(0, int(total * gpu_utilization) - used)

    def allocate_cache(self, num_blocks: int, prefault_blocks: int = 0) -> float | None:
        """Allocate the KV cache (same block count on every worker of the replica); on CPU fault the first
        `prefault_blocks` in. Returns the seconds that took (None: nothing faulted in)."""
        assert self.runner is not None
        self.torch_threads.add(threading.get_ident())
        return self.runner.allocate_cache(num_blocks, prefault_blocks)

    def execute(self, step: StepInput, hidden: tuple[np.ndarray, float, list[float]] | None,
                ) -> tuple[np.ndarray, float, list[float]] | StepOutput | None:
        """Run one step of this stage; `hidden` is the previous stage's output, passed as an object ref.

        Inner stages hand on (hidden states, wall time they finished, each stage's seconds so far), so the next
        stage can time the hand-off and the last one reports every stage's compute (`stage_<k>_s` timings).
        """
        assert self.runner is not None, "load() must run before execute()"
        self.torch_threads.add(threading.get_ident())
        handoff: float | None = None
        before: list[float] = []
        states: np.ndarray | None = None
        if hidden is not None:
            states, done_at, before = hidden
            handoff = time.time() - done_at  # wall clocks: comparable across hosts to NTP precision
        if self.step_threads is not None:
            self._set_threads(self.step_threads.choose(int(sum(step.query_lens))))
        start, comm = time.perf_counter(), self.runner.tp.comm_seconds
        out = self.runner.execute(step, states)
        end = time.perf_counter()
        self.window.record(start, end, self.runner.tp.comm_seconds - comm, handoff)
        if isinstance(out, np.ndarray):
            return out, time.time(), [*before, end - start]
        if isinstance(out, StepOutput):
            out.timings.update({f"stage_{k}_s": s for k, s in enumerate([*before, end - start])})
        return out

    @staticmethod
    def _set_threads(threads: int) -> None:
        """Run the coming step on `threads` OpenMP threads (OpenMP keeps the count per calling thread)."""
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def open_channel(self, timeout_s: float) -> tuple[str, bytes]:
        """Listen for the grid's direct step channel and serve it from a thread; returns (address, secret)."""
        plan = self.plan
        replies = plan.pp_rank == plan.pp_size - 1 and plan.tp_rank == 0
        self.channel = StepServer(self.execute, f"stage {plan.pp_rank} rank {plan.tp_rank}", plan.pp_rank > 0,
                                  replies)
        return self.channel.address, self.channel.token

    @ray.method(concurrency_group="channel")
    def serve_channel(self, timeout_s: float) -> None:
        """Serve the step channel until the driver hangs up (runs for the grid's life, on a Ray thread).

        The grid ran `load` and `allocate_cache` on this same thread (one OpenMP pool; why: WorkerGrid.__init__).
        """
        assert self.channel is not None, "open_channel() must run before serve_channel()"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # CUDA's current device is per thread
        self.channel.serve(timeout_s)

    def connect_channel(self, address: str, token: bytes, timeout_s: float) -> None:
        """Hand this stage's outputs to the next stage's worker of the same TP rank over the channel."""
        assert self.channel is not None, "open_channel() must run before connect_channel()"
        self.channel.connect_downstream(address, token, timeout_s)

    # On the probe thread, beside a running step: the slot it writes is pinned by no running sequence.
    @ray.method(concurrency_group="probe")
    def load_lora(self, slot: int, name: str, path: str) -> None:
        """Read, check and put a PEFT adapter into `slot` of this shard (ValueError naming it if bad)."""
        assert self.runner is not None, "load() must run before load_lora()"
        self.runner.load_lora(slot, name, path)

    @ray.method(concurrency_group="probe")
    def unload_lora(self, slot: int) -> None:
        """Empty adapter slot `slot` of this shard."""
        assert self.runner is not None, "load() must run before unload_lora()"
        self.runner.unload_lora(slot)

    @ray.method(concurrency_group="probe")
    def stats(self) -> dict[str, Any]:
        """Where this worker runs, its memory, and its utilization over recent steps (for /status, /metrics)."""
        assert self.runner is not None
        kv = self.runner.cache.num_blocks * self.runner.block_bytes() if self.runner.cache is not None else 0
        return {**self.where(), **memory_bytes(self.device), **self.window.summary(),
                "weight_bytes": self.runner.weight_bytes(), "kv_bytes": kv, "torch_threads": len(self.torch_threads),
                "matmul_paths": matmul_plan.describe(self.runner.matmul_plans) or None,
                "step_threads": self.step_threads.picks() if self.step_threads is not None else None}

    def shutdown(self) -> None:
        """Leave the process group so the actor can exit cleanly."""
        if dist.is_initialized():
            dist.destroy_process_group()
