"""Real Ray grids (gloo TP groups, object-ref hand-off between stages) against transformers."""
from __future__ import annotations

import numpy as np
import pytest

from actors.shard.runner import StepInput
from actors.shard.sampler import SamplingParams
from tests.ray_grid import make_grid
from tests.reference import PROMPTS, grid_greedy, hf_greedy
from tests.waits import wait_until

pytestmark = pytest.mark.slow  # a Ray cluster per module
NEW = 10
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]
# Every layout once; the other families where their difference meets Ray (QKV bias over a gloo TP group and a
# stage hand-off; a tied LM head on the last of two stages; one KV head replicated over four ranks). Every family
# at every layout runs in-process in tests/unit/test_model_vs_hf.py: the shard code is the same.
CASES = [("llama_gqa", tp, pp) for tp, pp in LAYOUTS] + [("qwen2_bias", 2, 2), ("llama_tied_mqa", 1, 2),
                                                         ("llama_tied_mqa", 4, 1)]


def prefill_step(prompt: list[int]) -> StepInput:
    """A one-sequence prefill step that also returns the last-position logits (blocks 100.. are unused)."""
    n = len(prompt)
    return StepInput(np.asarray(prompt, dtype=np.int64), np.arange(n, dtype=np.int64), [n], [n],
                     [list(range(100, 100 + -(-n // 4)))], [SamplingParams(temperature=0.0)], [0],
                     return_logits=True)


@pytest.mark.parametrize("variant,tp,pp", CASES)
def test_grid_greedy_matches_hf(local_ray: None, model_dirs: dict, variant: str, tp: int, pp: int) -> None:
    """Every layout generates exactly HF's greedy tokens (fp32 logits within 1e-3), one actor per logical GPU."""
    refs = [hf_greedy(model_dirs[variant], p, NEW) for p in PROMPTS]
    grid = make_grid(str(model_dirs[variant]), tp, pp)
    try:
        logits = grid.execute(prefill_step(PROMPTS[0])).logits
        assert logits is not None and np.abs(logits[0] - refs[0][1].numpy()).max() < 1e-3
        assert len({(w["node_id"], w["pid"]) for w in grid.layout_table()}) == tp * pp  # one process per worker
        assert all(len(w["gpu_ids"]) == 1 for w in grid.layout_table())
        assert grid_greedy(grid, PROMPTS, NEW, block_size=4) == [tokens for tokens, _ in refs]
    finally:
        grid.shutdown()


def test_channel_steps_run_on_the_thread_that_loaded(local_ray: None, model_dirs: dict) -> None:
    """Over the step channel, each worker's loading and steps share one Python thread (one OpenMP pool)."""
    grid = make_grid(str(model_dirs["llama_gqa"]), 1, 2, step_channel="socket")
    try:
        assert grid_greedy(grid, PROMPTS[:2], 3, block_size=4) == [t for t, _ in (hf_greedy(
            model_dirs["llama_gqa"], p, 3) for p in PROMPTS[:2])]
        assert [s["torch_threads"] for s in grid.worker_stats()] == [1, 1]
    finally:
        grid.shutdown()


def test_a_cpu_worker_with_two_threads_picks_a_count_per_step_size(local_ray: None, model_dirs: dict) -> None:
    """Steps of one size class are measured on 1 and 2 threads, then run on the faster; tokens stay HF's."""
    grid = make_grid(str(model_dirs["llama_gqa"]), 1, 1, resource="CPU", cpus_per_worker=2)
    try:
        assert grid_greedy(grid, PROMPTS, 24, block_size=4) == [t for t, _ in (hf_greedy(
            model_dirs["llama_gqa"], p, 24) for p in PROMPTS)]
        picks = grid.worker_stats()[0]["step_threads"]
        assert picks and set(picks.values()) <= {1, 2}, picks  # at least the decode steps' class settled
    finally:
        grid.shutdown()


def test_stage_outputs_never_reach_the_driver(local_ray: None, model_dirs: dict) -> None:
    """Only the last stage's refs come back from submit(); the stage-0 refs are consumed actor to actor."""
    import ray

    from actors.shard.sampler import SamplingParams
    from cluster.blocks import BlockManager
    from cluster.scheduler import Scheduler, Sequence

    grid = make_grid(str(model_dirs["llama_gqa"]), 2, 2)
    try:
        sched = Scheduler(BlockManager(grid.num_blocks, 4), 4, 256, 256)
        sched.add(Sequence(0, PROMPTS[0], SamplingParams(temperature=0.0), 4))
        refs = grid.submit(sched.build_step(sched.schedule()))
        outs = ray.get(refs)
        assert len(refs) == 2 and outs[1] is None and outs[0].token_ids  # rank 0 answers, rank 1 stays silent
    finally:
        grid.shutdown()


@pytest.mark.timeout(120)
def test_placement_timeout_is_bounded(local_ray: None, model_dirs: dict) -> None:
    """A grid that cannot be placed gives up (placement_timeout_s) naming needed vs available, and releases its
    half-made reservation."""
    import ray

    blocker = ray.util.placement_group([{"GPU": 3}])
    assert blocker.wait(60)
    try:
        with pytest.raises(TimeoutError, match=r"4 GPU as 2 bundles.*placement_timeout_s=3.*available now: 1 GPU"):
            make_grid(str(model_dirs["llama_gqa"]), 2, 2, placement_timeout_s=3)
        wait_until(lambda: ray.available_resources().get("GPU") == 1, 30, "the timed-out group's GPUs to be freed")
    finally:
        ray.util.remove_placement_group(blocker)


def listening_addresses(pid: int) -> list[str]:
    """'ip:port' of every TCP socket process `pid` listens on (read from /proc, no extra dependency)."""
    import os
    import socket

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                addr, port = cols[1].split(":")
                raw = bytes.fromhex(addr)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc stores host-order words
                found.append(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return found


def test_workers_listen_on_loopback_only(local_ray: None, model_dirs: dict) -> None:
    """On a loopback cluster every socket a TP worker listens on (Ray's, gloo's, and the TP rendezvous store,
    which torch alone would open on every interface) is on 127.0.0.1, and the grid still runs."""
    grid = make_grid(str(model_dirs["llama_gqa"]), 2, 1)
    try:
        pids = [w["pid"] for w in grid.where]
        addresses = [a for pid in pids for a in listening_addresses(pid)]
        loopback = ("127.", "::ffff:127.", "::1:")
        assert addresses and all(a.startswith(loopback) for a in addresses), addresses
        assert grid.execute(prefill_step(PROMPTS[0])).token_ids
    finally:
        grid.shutdown()


def test_local_ray_probe_sees_a_running_cluster(local_ray: None) -> None:
    """`gridserve serve` / `batch` join a Ray already running here instead of re-pinning its address."""
    from cluster.loopback import local_ray_running

    assert local_ray_running()
