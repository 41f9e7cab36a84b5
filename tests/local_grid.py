"""An in-process TP x PP grid for unit tests: TP ranks are threads, collectives go through shared memory."""
from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from actors.shard.runner import ShardPlan, StageRunner, StepInput, StepOutput
from actors.shard.tp import TPGroup
from actors.shard.usage import StepWindow, memory_bytes
from cluster.config import GridServeConfig


class ThreadCollectives:
    """Shared state through which the threads of one TP group sum and gather tensors."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list[torch.Tensor | None] = [None] * size


class ThreadTPGroup(TPGroup):
    """A TPGroup whose collectives run between threads of one process (no torch.distributed)."""

    def __init__(self, rank: int, shared: ThreadCollectives) -> None:
        super().__init__(rank, shared.size, process_group=object())
        self.shared = shared

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.shared.slots[self.rank] = x.clone()
        self.shared.barrier.wait()
        parts = [t for t in self.shared.slots]  # type: ignore[misc]
        self.shared.barrier.wait()
        self.num_collectives += 1
        return parts  # type: ignore[return-value]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p  # same order on every rank: identical results
        x.copy_(total)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.cat(self._exchange(x), dim=dim)


class LocalGrid:
    """tp x pp StageRunners in one process, driven like the Ray grid (same StepInput / StepOutput)."""

    def __init__(self, model_dir: str, tp: int, pp: int, num_blocks: int = 64, block_size: int = 4,
                 dtype: str | None = None, max_model_len: int = 256, partition: tuple[int, ...] | None = None,
                 max_loras: int = 0, max_lora_rank: int = 16) -> None:
        self.tp, self.pp, self.num_blocks = tp, pp, num_blocks
        self.stages: list[list[StageRunner]] = []
        for pp_rank in range(pp):
            shared = ThreadCollectives(tp)
            groups = [ThreadTPGroup(r, shared) if tp > 1 else TPGroup.single() for r in range(tp)]
            plans = [ShardPlan(model_dir, r, tp, pp_rank, pp, dtype, max_model_len, block_size, partition,
                               max_loras=max_loras, max_lora_rank=max_lora_rank) for r in range(tp)]
            with ThreadPoolExecutor(tp) as pool:
                stage = list(pool.map(lambda a: StageRunner(a[0], a[1], torch.device("cpu")), zip(plans, groups)))
            for runner in stage:
                runner.allocate_cache(num_blocks)
            self.stages.append(stage)
        self.pool = ThreadPoolExecutor(tp)
        self.steps = ThreadPoolExecutor(1)  # steps run one after another, as on one actor per worker
        self.windows = [StepWindow() for _ in range(tp * pp)]

    async def step_async(self, step: StepInput) -> StepOutput:
        """Async counterpart of execute(), as the engine calls it."""
        return await asyncio.wrap_future(self.steps.submit(self.execute, step))

    def execute(self, step: StepInput) -> StepOutput:
        hidden = None
        for k, stage in enumerate(self.stages):
            start = time.perf_counter()
            outs = list(self.pool.map(lambda r, h=hidden: r.execute(step, h), stage))
            for r in range(self.tp):
                self.windows[k * self.tp + r].record(start, time.perf_counter(), 0.0)
            hidden = outs[0]
        assert isinstance(hidden, StepOutput)
        return hidden

    async def load_lora(self, slot: int, name: str, path: str) -> None:
        """Put a PEFT adapter into `slot` on every runner (as WorkerGrid does on every worker)."""
        await asyncio.wrap_future(self.steps.submit(self._each, lambda r: r.load_lora(slot, name, path)))

    async def unload_lora(self, slot: int) -> None:
        """Empty `slot` on every runner."""
        await asyncio.wrap_future(self.steps.submit(self._each, lambda r: r.unload_lora(slot)))

    def _each(self, call: Callable[[StageRunner], None]) -> None:
        """Run `call` on every runner, between steps."""
        for stage in self.stages:
            for runner in stage:
                call(runner)

    def worker_stats(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """What a Ray worker reports, for the runners of this process (stage-major)."""
        out = []
        for k, stage in enumerate(self.stages):
            for r, runner in enumerate(stage):
                kv = runner.cache.num_blocks * runner.block_bytes() if runner.cache is not None else 0
                out.append({"node_id": "local", "pid": os.getpid(), "device": "cpu", "pp_rank": k, "tp_rank": r,
                            "weight_bytes": runner.weight_bytes(), "kv_bytes": kv, **memory_bytes(runner.device),
                            "torch_threads": 0,  # no worker process of its own: nothing to count
                            **self.windows[k * self.tp + r].summary()})
        return out

    def close_dag(self) -> None:
        """Nothing is compiled in-process: steps are plain function calls."""

    def shutdown(self) -> None:
        """Stop the step threads."""
        self.pool.shutdown()
        self.steps.shutdown()


class DyingGrid(LocalGrid):
    """A LocalGrid whose worker "dies" at step `die_at`: that step and every later one raise."""

    def __init__(self, model_dir: str, die_at: int) -> None:
        super().__init__(model_dir, 1, 1)
        self.die_at, self.steps_run = die_at, 0

    async def step_async(self, step: StepInput) -> StepOutput:
        self.steps_run += 1
        if self.steps_run >= self.die_at:
            raise RuntimeError("worker died (ActorDiedError in a real grid)")
        return await super().step_async(step)


def config(model_dir: Any, **extra: Any) -> GridServeConfig:
    """A small replica config matching LocalGrid's defaults."""
    return GridServeConfig(model=str(model_dir), max_model_len=256, max_num_batched_tokens=256, block_size=4,
                           **extra)


def grids(*makers: Callable[[], Any]) -> Callable[[], Any]:
    """A grid factory returning the next maker's grid on each call (first grid, then each rebuild)."""
    it = iter(makers)

    def make() -> Any:
        maker = next(it, None)
        if maker is None:  # a StopIteration raised into a thread's future would hang the test instead
            raise RuntimeError("the test gave no grid for this rebuild")
        return maker()
    return make
