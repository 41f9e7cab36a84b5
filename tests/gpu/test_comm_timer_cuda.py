"""The all-reduce share on CUDA is device time between CUDA events, not the launch a host clock sees
(skipped without CUDA)."""
from __future__ import annotations

import multiprocessing as mp
import time
from datetime import timedelta

import pytest
import torch

from tests.loopback import LOOPBACK, spawn_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SPIN_CYCLES = 100_000_000  # ~50 ms of GPU clock: long next to a kernel launch (microseconds)


def test_spans_measure_device_work_not_its_launch() -> None:
    """An asynchronous GPU spin: the host clock around its launch sees almost nothing, the events see the spin."""
    from actors.comm_timer import CudaSpans

    torch.cuda.init()
    torch.cuda._sleep(1000)  # warm up the kernel
    torch.cuda.synchronize()
    spans = CudaSpans()
    begin = time.perf_counter()
    start = spans.start()
    torch.cuda._sleep(SPIN_CYCLES)
    spans.stop(start)
    launch = time.perf_counter() - begin
    torch.cuda.synchronize()
    wall = time.perf_counter() - begin
    device = spans.total()
    assert launch < 0.5 * device, (launch, device)  # what a host timer would have reported
    assert 0.5 * wall <= device <= wall, (device, wall)


def rank_main(rank: int, port: int, queue: mp.Queue) -> None:
    """Two ranks on one GPU (gloo handles CUDA tensors; NCCL needs a GPU per rank): rank 1's all-reduce input is
    ready only after a GPU spin, so rank 0 waits inside the collective."""
    import torch.distributed as dist

    from actors.comm_timer import tp_group

    torch.cuda.set_device(0)
    store = dist.TCPStore(LOOPBACK, port, 2, rank == 0, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    group = tp_group(rank, 2, dist.group.WORLD, None, torch.device("cuda", 0))
    x = torch.full((1024,), float(rank + 1), device="cuda")
    dist.barrier()
    if rank == 1:
        torch.cuda._sleep(SPIN_CYCLES)
    out = group.all_reduce(x)
    total = float(out[0])
    queue.put((rank, type(group).__name__, group.comm_seconds, group.num_collectives, total))
    dist.destroy_process_group()


def test_cuda_group_times_the_collective_on_the_device() -> None:
    """The CUDA path uses CudaTimedTPGroup; rank 0's comm time covers its wait for rank 1's late input."""
    results = spawn_ranks(rank_main, 2)
    name, comm0, count, total = results[0]
    assert name == "CudaTimedTPGroup" and count == 1 and total == 3.0
    assert comm0 >= 0.01, comm0  # the ~50 ms spin of rank 1, seen from rank 0's stream
