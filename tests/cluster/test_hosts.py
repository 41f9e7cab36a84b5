"""Pipelines across hosts with their own networks (tests/hostbed.py): the batch job through `ray job submit`, its
stages on different hosts handing hidden states over as Ray objects, greedy output identical to Hugging Face's."""
from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import hostbed
from tests.ray_cli import processes_with, submit
from tests.reference import hf_greedy
from tests.waits import wait_until

pytestmark = pytest.mark.slow

PROMPTS = [[3, 17, 5, 42, 8, 11], [7, 7, 1, 30], [50, 12, 4, 19, 25, 26, 27]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def bed() -> Iterator[hostbed.HostBed]:
    """Two hosts, each with 1 CPU and 2 logical GPUs (workers compute on the CPU)."""
    reason = hostbed.missing()
    if reason:
        pytest.skip(reason)
    with hostbed.host_bed(2, cpus=1, gpus=2) as b:
        yield b


def test_failed_bring_up_leaves_nothing() -> None:
    """A bed whose Ray never comes up in time is taken down whole: no namespace, link, process or file stays."""
    reason = hostbed.missing()
    if reason:
        pytest.skip(reason)
    before = bed_objects()
    with pytest.raises(TimeoutError, match="alive Ray nodes"):
        hostbed.up(2, timeout_s=0.5)
    assert bed_objects() == before


def bed_objects() -> tuple[str, str, list[str], list[str]]:
    """This process's beds as the system shows them: namespaces, links, state folders, processes."""
    tag = f"gs{os.getpid()}"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    folders = sorted(p.name for p in hostbed.STATE_ROOT.glob(f"{tag}*"))
    procs = [p for p in processes_with(str(hostbed.STATE_ROOT / tag)) if p != os.getpid()]
    return (" ".join(w for w in netns.split() if tag in w), " ".join(w for w in links.split() if tag in w),
            folders, sorted(map(str, procs)))


# job id -> (model variant, grid args). Their workers take disjoint resources (CPUs vs GPUs), so both run at once.
JOBS: dict[str, tuple[str, dict[str, object]]] = {
    "gs-pp2": ("llama_gqa", {"pipeline_parallel_size": 2, "resource": "CPU", "cpus_per_worker": 1}),
    "gs-tp2pp2": ("qwen2_bias", {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
}


@pytest.fixture(scope="module")
def jobs(bed: hostbed.HostBed, model_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every job of JOBS submitted to the bed (not awaited); job id -> its output file."""
    outputs = {}
    for job_id, (variant, grid) in JOBS.items():
        tmp = tmp_path_factory.mktemp(job_id)
        config, src, outputs[job_id] = tmp / "serve.yaml", tmp / "in.jsonl", tmp / "out.jsonl"
        args = {"model": str(model_dirs[variant]), "max_num_seqs": 4, **grid}
        config.write_text(json.dumps({"applications": [{"name": "g", "args": args,
                                                        "import_path": "deployments.serve_app:build_app"}]}))
        src.write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": p, "temperature": 0,
                                           "max_tokens": NEW_TOKENS, "ignore_eos": True}) + "\n"
                               for i, p in enumerate(PROMPTS)))
        submit(bed.dashboard_url, bed.env(), ["--config", str(config), "--input", str(src), "--output",
                                              str(outputs[job_id])], job_id, wait=False)
    return outputs


def finished(bed: hostbed.HostBed, jobs: dict[str, Path], job_id: str) -> list[dict]:
    """The output lines of a job once it has ended (it must have succeeded)."""
    def ended() -> str:
        status = bed.api(f"/api/jobs/{job_id}")["status"]
        return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else ""

    status = wait_until(ended, 300, f"job {job_id} to end", poll_s=1)
    assert status == "SUCCEEDED", bed.api(f"/api/jobs/{job_id}/logs")["logs"][-3000:]
    return [json.loads(x) for x in jobs[job_id].read_text().splitlines()]


def worker_hosts(bed: hostbed.HostBed, job_id: str) -> Counter[str]:
    """How many of the job's grid workers ran on each host address (from Ray's actor table)."""
    ray_job = bed.api(f"/api/jobs/{job_id}")["job_id"]
    address = {n["node_id"]: n["node_ip"] for n in bed.state("nodes")}
    return Counter(address[a["node_id"]] for a in bed.state("actors", class_name="Worker", job_id=ray_job))


def expected(model: Path) -> list[list[int]]:
    """Hugging Face greedy continuations of PROMPTS."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return [hf_greedy(model, p, NEW_TOKENS, hf)[0] for p in PROMPTS]


def test_two_stages_on_two_hosts(bed: hostbed.HostBed, jobs: dict[str, Path], model_dirs: dict) -> None:
    """tp=1 x pp=2 with one CPU per host: each stage on its own host; output identical to HF greedy."""
    out = finished(bed, jobs, "gs-pp2")
    assert [o["token_ids"] for o in out] == expected(model_dirs["llama_gqa"])
    assert sorted(worker_hosts(bed, "gs-pp2").items()) == [(h.address, 1) for h in bed.hosts]


def test_tp2_stages_on_two_hosts(bed: hostbed.HostBed, jobs: dict[str, Path], model_dirs: dict) -> None:
    """tp=2 x pp=2 on hosts with 2 GPUs each: a stage (its whole TP group) per host; output identical to HF."""
    out = finished(bed, jobs, "gs-tp2pp2")
    assert [o["token_ids"] for o in out] == expected(model_dirs["qwen2_bias"])
    assert sorted(worker_hosts(bed, "gs-tp2pp2").items()) == [(h.address, 2) for h in bed.hosts]
