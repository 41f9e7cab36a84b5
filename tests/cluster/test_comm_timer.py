"""The all-reduce share on CPU: a worker's TP group times collectives with the host clock (gloo is synchronous),
so time spent waiting for a slower rank inside the collective is counted."""
from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import torch

from tests.loopback import LOOPBACK, spawn_ranks

DELAY_S = 0.25  # exact in binary, so the fake clock's sums are exact


class StoreClock:
    """A fake `perf_counter` both ranks read from the rendezvous store: time moves only when a rank moves it, so
    what a group counts does not depend on how busy the machine is."""

    def __init__(self, store: Any, rank: int) -> None:
        self.store = store
        self.rank = rank

    def perf_counter(self) -> float:
        """The shared time; rank 0 then says it has started timing."""
        now = self.store.add("now_us", 0) / 1e6  # `add` answers, so it sees every earlier `add` (a `set` may lag)
        if self.rank == 0:
            self.store.set("rank0_timing", "1")
        return now

    def advance(self, seconds: float) -> None:
        """Move the shared time on (returns once the store has it)."""
        self.store.add("now_us", round(seconds * 1e6))


def rank_main(rank: int, port: int, queue: mp.Queue) -> None:
    """Join a 2-rank gloo group; rank 1 enters the first all-reduce DELAY_S late (by the fake clock, after rank 0
    has started timing it); report rank's timing."""
    import torch.distributed as dist

    import actors.shard.tp as tp
    from actors.comm_timer import tp_group

    store = dist.TCPStore(LOOPBACK, port, 2, rank == 0, timedelta(seconds=60))
    clock = StoreClock(store, rank)
    tp.time = SimpleNamespace(perf_counter=clock.perf_counter)  # this process's own copy of the module
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    group = tp_group(rank, 2, dist.group.WORLD, None, torch.device("cpu"))
    dist.barrier()
    if rank == 1:
        store.wait(["rank0_timing"])  # rank 0 is inside its first all-reduce, waiting for this rank
        clock.advance(DELAY_S)
    sums = [float(group.all_reduce(torch.full((4,), float(rank + i)))[0]) for i in range(5)]
    queue.put((rank, type(group).__name__, group.comm_seconds, group.num_collectives, sums))
    dist.destroy_process_group()


def test_cpu_group_counts_the_wait_inside_collectives() -> None:
    """Rank 0's comm time is exactly the late rank's delay; the late rank waited for nothing; sums are right;
    the CPU path uses TPGroup."""
    results = spawn_ranks(rank_main, 2)
    name, comm0, count, sums = results[0]
    assert name == "TPGroup" and count == 5 and sums == [1.0 + 2 * i for i in range(5)]
    assert comm0 == DELAY_S and results[1][1] == 0.0, (comm0, results[1][1])
