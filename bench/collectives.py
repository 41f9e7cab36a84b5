"""Two-process all-reduce of one hidden vector: the shared-memory group vs gloo over loopback TCP.

python -m bench.collectives [--floats 768] [--calls 5000]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time
import uuid
from datetime import timedelta

import torch


def _rank(kind: str, rank: int, where: str, floats: int, calls: int, out: mp.Queue) -> None:
    """One rank: `calls` timed all-reduces after 200 warm-ups; reports microseconds per call."""
    import torch.distributed as dist

    from actors.shard.shm import ShmGroup

    torch.set_num_threads(1)
    x = torch.randn(floats)
    if kind == "shm":
        reduce = ShmGroup(where, rank, 2, floats * 4, 30.0, create=False).all_reduce
    else:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("gloo", init_method=where, rank=rank, world_size=2, timeout=timedelta(seconds=60))
        reduce = dist.all_reduce
    for _ in range(200):
        reduce(x)
    start = time.perf_counter()
    for _ in range(calls):
        reduce(x)
    out.put(1e6 * (time.perf_counter() - start) / calls)


def measure(kind: str, floats: int, calls: int) -> float:
    """Mean microseconds per all-reduce over both ranks."""
    from actors.shard.shm import ShmGroup

    if kind == "shm":
        where = f"/dev/shm/gridserve-bench-{uuid.uuid4().hex}"
        ShmGroup(where, 0, 2, floats * 4, 30.0, create=True).close()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            where = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(kind, r, where, floats, calls, out)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        return sum(out.get(timeout=300) for _ in procs) / 2
    finally:
        for p in procs:
            p.join(timeout=30)
        if kind == "shm":
            os.unlink(where)


def main() -> None:
    """Print both figures."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--floats", type=int, default=768)
    ap.add_argument("--calls", type=int, default=5000)
    a = ap.parse_args()
    print(f"all-reduce of {a.floats} fp32 between 2 processes ({os.cpu_count()} cores), mean of {a.calls} calls:")
    for kind in ("shm", "gloo"):
        print(f"  {kind}: {measure(kind, a.floats, a.calls):.1f} us per call")


if __name__ == "__main__":
    main()
