"""The batch job through a real `ray start --head` (token auth on) and `ray job submit`, killed and resumed."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.loopback import LOOPBACK_ENV
from tests.loopback import free_port
from tests.ray_cli import stop_processes, submit
from tests.reference import hf_greedy
from tests.waits import wait_until

pytestmark = pytest.mark.slow  # a `ray start` cluster and two job submissions


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head` on free loopback ports with token auth; yields (dashboard URL, env for the ray CLI)."""
    temp = tempfile.mkdtemp(prefix="gs-ray-")  # short: Ray's socket paths must stay under ~100 characters
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Token auth on, with this test's own token file; LOOPBACK_ENV=0 makes `ray start` keep every address on
    # loopback (else it swaps 127.0.0.1 for the machine's outward address).
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), LOOPBACK_ENV: "0",
                "TOKENIZERS_PARALLELISM": "false"})
    dash = free_port()
    ports = ["--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port"]
    cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=4", "--num-gpus=0",
           "--disable-usage-stats", f"--temp-dir={temp}"] + [f"{p}={free_port()}" for p in ports]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)


def write_job(tmp: Path, model: Path, n: int, max_tokens: int) -> tuple[Path, Path, Path]:
    """A Serve config naming the model (tp=1, pp=2, CPU workers) and an input of `n` greedy lines."""
    config, src = tmp / "serve.yaml", tmp / "in.jsonl"
    config.write_text(json.dumps({"applications": [{"name": "g", "import_path": "deployments.serve_app:build_app",
                                                    "args": {"model": str(model), "pipeline_parallel_size": 2,
                                                             "max_num_seqs": 2,
                                                             "cpus_per_worker": 1}}]}))
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": [3 + i % 50, 17, 5], "temperature": 0,
                                       "max_tokens": max_tokens, "ignore_eos": True}) + "\n" for i in range(n)))
    return config, src, tmp / "out.jsonl"


def test_job_submit_then_kill_and_resume(ray_head: tuple[str, dict[str, str]], model_dirs: dict,
                                         tmp_path: Path) -> None:
    """A killed job leaves finished lines on disk; the rerun skips them; the final file is whole, unique, ordered."""
    url, env = ray_head
    model = model_dirs["llama_gqa"]
    n, new = 48, 40
    config, src, dst = write_job(tmp_path, model, n, new)
    args = ["--config", str(config), "--input", str(src), "--output", str(dst)]
    submit(url, env, args, "gs-first", wait=False)
    wait_until(lambda: dst.exists() and len(dst.read_text().splitlines()) >= 4, 240, "4 finished lines")
    subprocess.run(["ray", "job", "stop", "--address", url, "gs-first"], env=env, capture_output=True, timeout=120)
    kept = len(dst.read_text().splitlines())
    assert 4 <= kept < n, f"the kill came too late to test resuming ({kept} of {n} lines done)"

    log = submit(url, env, args, "gs-second")
    assert "succeeded" in log, log[-3000:]
    skipped = int(re.search(r"\((\d+) already done, skipped\)", log).group(1))
    assert skipped >= kept - 1  # every whole line the killed job wrote (the last one may be torn)
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == [f"r{i}" for i in range(n)]
    assert all("error" not in o and o["usage"]["completion_tokens"] == new for o in out)
    for i in (0, n - 1):
        assert out[i]["token_ids"] == hf_greedy(model, [3 + i % 50, 17, 5], new)[0]
