"""The all-reduce share on CPU: a worker's TP group times collectives with the host clock (gloo is synchronous),
so time spent waiting for a slower rank inside the collective is counted."""
from __future__ import annotations

import multiprocessing as mp
import time
from datetime import timedelta

import torch

from tests.loopback import LOOPBACK, spawn_ranks

DELAY_S = 0.3


def rank_main(rank: int, port: int, queue: mp.Queue) -> None:
    """Join a 2-rank gloo group; rank 1 enters the first all-reduce DELAY_S late; report rank's timing."""
    import torch.distributed as dist

    from actors.comm_timer import tp_group

    store = dist.TCPStore(LOOPBACK, port, 2, rank == 0, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    group = tp_group(rank, 2, dist.group.WORLD, None, torch.device("cpu"))
    dist.barrier()
    if rank == 1:
        time.sleep(DELAY_S)  # the slow rank: its peer waits inside the collective
    sums = [float(group.all_reduce(torch.full((4,), float(rank + i)))[0]) for i in range(5)]
    queue.put((rank, type(group).__name__, group.comm_seconds, group.num_collectives, sums))
    dist.destroy_process_group()


def test_cpu_group_counts_the_wait_inside_collectives() -> None:
    """Rank 0's comm time includes the wait for the late rank; sums are right; the CPU path uses TPGroup."""
    results = spawn_ranks(rank_main, 2)
    name, comm0, count, sums = results[0]
    assert name == "TPGroup" and count == 5 and sums == [1.0 + 2 * i for i in range(5)]
    assert comm0 >= DELAY_S / 3 and results[1][1] < comm0  # the late rank hardly waited
