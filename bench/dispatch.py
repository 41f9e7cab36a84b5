"""Per-step dispatch of the engine's grid: plain actor calls and a Ray Compiled Graph, each beside Ray's own floor
for the same call shape (no-op actors, same step payload). Part of `python -m bench.engine --only dispatch`."""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from actors.shard.runner import StepInput, StepOutput
from bench.common import BUDGET, CORES, ensure_model, greedy, make_grid, model_info, prompts, table
from cluster.blocks import BlockManager
from cluster.scheduler import Scheduler, Sequence

TINY_MODEL = "models/bench-dispatch-tiny"  # hidden 16, 2 layers: a step costs next to nothing but dispatch
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=64)


def decode_steps(execute: Callable[[StepInput], StepOutput], sched: Scheduler, n: int,
                 warmup: int = 10) -> tuple[list[float], list[float]]:
    """Wall and last-stage step_s of `n` sequential decode steps through `execute` (after prefill + warm-up)."""
    walls, computes = [], []
    for i in range(1 + warmup + n):
        batch = sched.schedule()
        step = sched.build_step(batch)
        t0 = time.perf_counter()
        out = execute(step)
        wall = time.perf_counter() - t0
        sched.update(batch, out)
        if i > warmup:
            walls.append(wall)
            computes.append(out.timings["step_s"])
    return walls, computes


def dispatch_rows(model: str, tp: int, pp: int, n: int) -> list[list[Any]]:
    """Plain actor calls, the socket channel and the compiled graph on one tp x pp layout: n single-sequence
    decode steps each (the compiled graph needs a grid of its own: it replaces the channel)."""
    rows = []
    for grid in (make_grid(model, tp=tp, pp=pp, kv_mib=8, channel="socket"),
                 make_grid(model, tp=tp, pp=pp, kv_mib=8, compiled=True)):
        loop = asyncio.new_event_loop()  # the compiled graph's channel readers live on this loop

        def stepped(step: StepInput) -> StepOutput:
            return loop.run_until_complete(grid.step_async(step))

        variants: dict[str, Callable[[StepInput], StepOutput]] = (
            {"Ray Compiled Graph": stepped} if grid.use_compiled
            else {"plain actor calls": grid.execute, "socket channel": stepped})
        try:
            for name, execute in variants.items():
                sched = Scheduler(BlockManager(grid.num_blocks, grid.cfg.block_size), 1, BUDGET,
                                  grid.cfg.max_model_len)
                sched.add(Sequence(0, prompts(1, 8, model)[0], greedy(), n + 20))
                walls, computes = decode_steps(execute, sched, n)
                ms, cms = 1000 * np.array(walls), 1000 * np.array(computes)
                rows.append([f"tp={tp} pp={pp}", name, f"{CORES / (tp * pp):g}", n, ms.mean(), np.median(ms),
                             np.percentile(ms, 99), cms.mean(), ms.mean() - cms.mean()])
        finally:
            async def close() -> None:
                grid.close_dag()

            loop.run_until_complete(close())
            loop.close()
            grid.shutdown()
    return rows


@ray.remote
class Echo:
    """A worker stand-in that does no work: answers a step the way a real stage does (hidden tuple or tokens)."""

    def __init__(self, last: bool) -> None:
        self.last = last

    def execute(self, step: StepInput, hidden: Any) -> Any:
        """Hand on a one-token hidden state, or (last stage) one sampled token."""
        if self.last:
            return StepOutput([3], timings={"step_s": 0.0})
        return np.zeros((1, 16), np.float32), time.time(), [0.0]

    def pid(self) -> int:
        """This actor's process id."""
        return os.getpid()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_share(pids: list[int], seconds: float = 2.0) -> float:
    """Mean CPU share each process uses while nothing is sent to it (a busy-waiting reader shows up here)."""
    before = [cpu_seconds(p) for p in pids]
    time.sleep(seconds)
    return float(np.mean([cpu_seconds(p) - b for p, b in zip(pids, before)])) / seconds


def floor_rows(tp: int, pp: int, step: StepInput, n: int) -> tuple[list[list[Any]], float]:
    """Ray's own cost of the same step shape: tp x pp no-op actors, plain calls and a compiled graph; also the CPU
    share each of those actors burns while the compiled graph waits for input."""
    from ray.dag import InputNode, MultiOutputNode

    cpus = CORES / (tp * pp)
    stages = [[Echo.options(num_cpus=cpus).remote(k == pp - 1) for _ in range(tp)] for k in range(pp)]

    def plain() -> None:
        hidden: list[Any] = [None] * tp
        for stage in stages:
            hidden = [w.execute.remote(step, h) for w, h in zip(stage, hidden)]
        ray.get(hidden)

    with InputNode() as inp:
        nodes: list[Any] = [None] * tp
        for stage in stages:
            nodes = [w.execute.bind(inp, h) for w, h in zip(stage, nodes)]
        dag = MultiOutputNode(nodes).experimental_compile()
    rows = []
    try:
        for name, fn in (("plain actor calls", plain), ("Ray Compiled Graph", lambda: ray.get(dag.execute(step)))):
            for _ in range(20):
                fn()
            walls = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                walls.append(1000 * (time.perf_counter() - t0))
            ms = np.array(walls)
            rows.append([f"tp={tp} pp={pp}", f"{name}, no-op actors (Ray's floor)", f"{cpus:g}", n, ms.mean(),
                         np.median(ms), np.percentile(ms, 99), 0.0, ms.mean()])
        idle = idle_cpu_share(ray.get([w.pid.remote() for stage in stages for w in stage]))
    finally:
        dag.teardown()
        for stage in stages:
            for w in stage:
                ray.kill(w)
    return rows, idle


def part_dispatch(quick: bool) -> None:
    """Per-step overhead of driving a grid one single-sequence decode step at a time: the tp=2 pp=2 target
    layout (4 workers on the cores) and tp=1 pp=2 (one core per worker), each beside Ray's own floor for the
    same shape (no-op actors, same step payload)."""
    n = 200
    model = ensure_model(TINY_MODEL, preset="tiny", **TINY)
    step = StepInput(np.array([5]), np.array([20]), [1], [21], [[0, 1]], [greedy()], [3])
    rows, idle = [], {}
    for tp, pp in ((1, 1), (2, 2), (1, 2)):
        floor, idle[f"tp={tp} pp={pp}"] = floor_rows(tp, pp, step, n)
        rows += dispatch_rows(model, tp, pp, n) + floor
    table(f"dispatch: batch 1 decode, {model_info(model)}",
          ["layout", "executor", "CPU per worker", "steps", "mean ms", "p50 ms", "p99 ms", "compute ms",
           "overhead ms"], rows,
          ["compute = last stage's StepOutput.timings['step_s'] (its TP rank 0: forward, TP all-reduces, LM head,",
           "sampling); overhead = mean wall - mean compute: the step sent inline to every actor call, stage 0's",
           "work and the activation hand-off, the answer's return. No-op rows: the same calls and payloads with",
           f"actors that do nothing, i.e. Ray's own cost. {CORES} cores; each worker 1 torch thread.",
           "While a compiled graph waits for input, each of its no-op actors burns "
           + ", ".join(f"{share:.2f} CPU ({layout})" for layout, share in idle.items())
           + ": Ray's channel readers busy-wait, so on shared cores they take time from the workers computing."])
