"""Faults on a bed of three hosts (tests/hostbed.py) under a `ray job submit` batch of tp=1 x pp=2: the host of
stage 1 killed whole, cut off, or its worker stopped past `step_timeout_s` (the last two until the grid has been
rebuilt). The job loses no line, writes none twice, exits 0, and every line equals Hugging Face's greedy
continuation: the requests in flight migrate to a grid rebuilt where there is room, as soon as a failed hand-off or
a step timeout says the grid is gone (never after Ray's own, much slower, dead-node detection)."""
from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import hostbed
from tests.ray_cli import submit
from tests.reference import hf_greedy
from tests.waits import wait_until

pytestmark = pytest.mark.slow

LINES, NEW_TOKENS = 16, 64
_rng = random.Random(29)
PROMPTS = [[_rng.randrange(3, 90) for _ in range(_rng.randrange(4, 12))] for _ in range(LINES)]
STEP_TIMEOUT_S = 5.0  # steps of the tiny model take milliseconds; a stopped worker is found after this
FAULT_MAX_S = 120.0  # longest a fault lasts while waiting for the grid to be rebuilt under it
# (bed, host of stage 1, its worker's pid on that host, whether the job's grid has been rebuilt yet)
Fault = Callable[[hostbed.HostBed, int, int, Callable[[], bool]], None]


@pytest.fixture(scope="module")
def bed() -> Iterator[hostbed.HostBed]:
    """Three hosts with one CPU and one logical GPU each: a pp=2 grid takes two, the third has room."""
    reason = hostbed.missing()
    if reason:
        pytest.skip(reason)
    with hostbed.host_bed(3, cpus=1, gpus=1) as b:
        yield b


@pytest.fixture(scope="module")
def expected(model_dirs: dict[str, Path]) -> list[list[int]]:
    """Hugging Face greedy continuations of PROMPTS, generated as one left-padded batch (the first checked
    against an unpadded run)."""
    import torch
    import transformers

    model = model_dirs["llama_gqa"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    batch = [row[width:].tolist() for row in out]
    assert batch[0] == hf_greedy(model, PROMPTS[0], NEW_TOKENS, hf)[0]
    return batch


def all_hosts_up(bed: hostbed.HostBed) -> None:
    """Restart every host a previous test left dead (killed, or its raylet gave up after a partition)."""
    alive = {n["node_ip"] for n in bed.nodes()}
    for h in bed.hosts[1:]:
        if h.address not in alive or not bed.running(h.index):
            bed.restart_host(h.index)


def hold_head(bed: hostbed.HostBed, job_id: str, release: Path) -> None:
    """A job on host 1 that holds its GPU until `release` exists: the grid under test lands on hosts 2 and 3, so
    the fault never hits the head (its GCS and the job's driver)."""
    bed.api("/api/jobs/", {"entrypoint": f"while [ ! -e {release} ]; do sleep 0.2; done", "submission_id": job_id,
                           "entrypoint_num_gpus": 1, "entrypoint_resources": {"host1": 1}})
    wait_until(lambda: bed.api(f"/api/jobs/{job_id}")["status"] == "RUNNING", 60, f"placeholder job {job_id}")


def driver_log(bed: hostbed.HostBed, job_id: str) -> str:
    """The job driver's log as written on the head (the dashboard's log API is slow on a loaded box)."""
    logs = list(Path(bed.hosts[0].temp_dir).glob(f"session_*/logs/job-driver-{job_id}.log"))
    return logs[0].read_text() if logs else ""


def job_status(bed: hostbed.HostBed, job_id: str) -> str:
    """The job's status once it ended, else ''."""
    status = bed.api(f"/api/jobs/{job_id}")["status"]
    return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else ""


def run_with_fault(bed: hostbed.HostBed, tmp: Path, model: Path, job_id: str, fault: Fault) -> tuple[list[dict], str]:
    """Submit the batch, apply `fault` once a few lines are done; (the job's output lines, its driver log)."""
    all_hosts_up(bed)
    release = tmp / "release"
    hold_head(bed, f"{job_id}-hold", release)
    config, src, out = tmp / "serve.json", tmp / "in.jsonl", tmp / "out.jsonl"
    args = {"model": str(model), "max_num_seqs": 4, "pipeline_parallel_size": 2, "step_timeout_s": STEP_TIMEOUT_S}
    config.write_text(json.dumps({"applications": [{"name": "g", "args": args,
                                                    "import_path": "deployments.serve_app:build_app"}]}))
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": p, "temperature": 0,
                                       "max_tokens": NEW_TOKENS, "ignore_eos": True}) + "\n"
                           for i, p in enumerate(PROMPTS)))
    submit(bed.dashboard_url, bed.env(), ["--config", str(config), "--input", str(src), "--output", str(out)],
           job_id, wait=False)
    placed = wait_until(lambda: re.search(r"stage 1 rank 0 on (\S+) pid (\d+)", driver_log(bed, job_id)), 180,
                        f"job {job_id}'s grid")
    release.touch()  # the grid is placed: host 1 has room again for the rebuilt one
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 3, 120, f"job {job_id}'s first lines")
    done = len(out.read_text().splitlines())
    address, pid = placed.group(1), int(placed.group(2))
    host = next(h.index for h in bed.hosts if h.address == address)
    assert host != 1, f"stage 1 landed on the head ({address}) although its GPU was held"
    fault(bed, host, pid, lambda: "grid rebuilt (1 so far)" in driver_log(bed, job_id))
    status = wait_until(lambda: job_status(bed, job_id), 300, f"job {job_id} to end", poll_s=1)
    log = driver_log(bed, job_id)
    assert status == "SUCCEEDED", log[-4000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert done < LINES, "the fault came after the job's work: make the batch longer"
    return lines, log


def check(lines: list[dict], log: str, expected: list[list[int]]) -> None:
    """Every line once, none failed, each HF-greedy identical; and the grid was in fact rebuilt under them."""
    assert [x.get("error") for x in lines if "error" in x] == []
    assert sorted(x["id"] for x in lines) == sorted(f"r{i}" for i in range(LINES))
    assert [x["token_ids"] for x in lines] == expected
    assert "grid rebuilt (1 so far)" in log, log[-4000:]


def kill_host(bed: hostbed.HostBed, host: int, pid: int, rebuilt: Callable[[], bool]) -> None:
    """Every process of the host at once: its raylet and workers."""
    bed.kill_host(host)


def partition(bed: hostbed.HostBed, host: int, pid: int, rebuilt: Callable[[], bool]) -> None:
    """The host's link down until the grid has been rebuilt off it, then up again."""
    bed.set_link(host, False)
    try:
        wait_until(rebuilt, FAULT_MAX_S, "the grid rebuilt while stage 1's host is cut off", poll_s=0.5)
    finally:
        bed.set_link(host, True)


def stop_worker(bed: hostbed.HostBed, host: int, pid: int, rebuilt: Callable[[], bool]) -> None:
    """SIGSTOP stage 1's worker until the grid has been rebuilt without it, then SIGCONT (it is usually killed by
    then)."""
    bed.run_on(host, ["kill", "-STOP", str(pid)], check=True)
    try:
        wait_until(rebuilt, FAULT_MAX_S, "the grid rebuilt while stage 1's worker is stopped", poll_s=0.5)
    finally:
        bed.run_on(host, ["kill", "-CONT", str(pid)])


def test_worker_stopped(bed: hostbed.HostBed, model_dirs: dict, expected: list, tmp_path: Path) -> None:
    """A worker stopped past step_timeout_s: the step times out, the grid is rebuilt (its host still answers)."""
    lines, log = run_with_fault(bed, tmp_path, model_dirs["llama_gqa"], "gs-stop", stop_worker)
    check(lines, log, expected)
    assert "do not answer" not in log, "a stopped worker's host still answers: it must not be avoided"


def test_host_partitioned(bed: hostbed.HostBed, model_dirs: dict, expected: list, tmp_path: Path) -> None:
    """Stage 1's host cut off: found unreachable, the grid rebuilt off it while the cable is out."""
    lines, log = run_with_fault(bed, tmp_path, model_dirs["llama_gqa"], "gs-cut", partition)
    check(lines, log, expected)
    assert "do not answer" in log, log[-4000:]


def test_host_killed(bed: hostbed.HostBed, model_dirs: dict, expected: list, tmp_path: Path) -> None:
    """Stage 1's host killed whole: the broken hand-off fails the grid at once, rebuilt on the host with room."""
    lines, log = run_with_fault(bed, tmp_path, model_dirs["llama_gqa"], "gs-kill", kill_host)
    check(lines, log, expected)
    assert "do not answer" in log, log[-4000:]
