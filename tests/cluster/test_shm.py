"""Shared-memory collectives between real processes: exact sums, gathers, fallback size check, dead-peer timeout."""
from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from pathlib import Path

import pytest
import torch

from actors.shard.shm import ShmGroup, supported

pytestmark = pytest.mark.skipif(not supported(), reason="shared-memory collectives need x86-64 and /dev/shm")
SHAPES = [(7,), (3, 64), (2, 5, 16)]


def tensors(rank: int) -> list[torch.Tensor]:
    """The inputs rank `rank` contributes: several shapes and dtypes, many calls (both buffer sets reused)."""
    g = torch.Generator().manual_seed(rank)
    out = []
    for i in range(30):
        dtype = (torch.float32, torch.bfloat16)[i % 2]
        out.append(torch.randn(SHAPES[i % 3], generator=g).to(dtype))
    return out


def run_rank(path: str, rank: int, size: int, queue: mp.Queue) -> None:
    """One process: all-reduce and all-gather every input, send the results back."""
    group = ShmGroup(path, rank, size, 4096, 20.0, create=False)
    results = []
    for x in tensors(rank):
        gathered = group.all_gather(x, dim=-1)
        results.append((group.all_reduce(x.clone()).float().numpy(), gathered.float().numpy()))
    queue.put((rank, results))  # numpy: torch tensors would travel as file descriptors that die with us


@pytest.mark.parametrize("size", [2, 3])
def test_all_reduce_and_gather_match_the_reference(size: int) -> None:
    """Every rank gets the rank-order sum (bit-identical across ranks) and the concatenation."""
    path = f"/dev/shm/gridserve-test-{uuid.uuid4().hex}"
    creator = ShmGroup(path, 0, size, 4096, 20.0, create=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(path, r, size, queue)) for r in range(1, size)]
    try:
        for p in procs:
            p.start()
        mine = []
        for x in tensors(0):
            gathered = creator.all_gather(x, dim=-1)
            mine.append((creator.all_reduce(x.clone()), gathered))
        others = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
        creator.close()
        os.unlink(path)
    inputs = [tensors(r) for r in range(size)]
    for i, (reduced, gathered) in enumerate(mine):
        expect = inputs[0][i].clone()
        for r in range(1, size):
            expect += inputs[r][i]
        assert torch.equal(reduced, expect)
        assert torch.equal(gathered, torch.cat([inputs[r][i] for r in range(size)], dim=-1))
        for r in range(1, size):
            assert (others[r][i][0] == reduced.float().numpy()).all()
            assert (others[r][i][1] == gathered.float().numpy()).all()


def test_missing_peer_times_out_and_too_big_is_refused(tmp_path: Path) -> None:
    """A rank whose peer never arrives raises after the timeout; tensors over the slot size are not taken."""
    path = f"/dev/shm/gridserve-test-{uuid.uuid4().hex}"
    group = ShmGroup(path, 0, 2, 64, 0.5, create=True)
    try:
        assert group.fits(torch.zeros(16)) and not group.fits(torch.zeros(17))
        with pytest.raises(RuntimeError, match="missed shared-memory collective 1"):
            group.all_reduce(torch.ones(4))
    finally:
        group.close()
        os.unlink(path)
