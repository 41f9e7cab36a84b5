"""Helpers the benchmarks share: seeded benchmark checkpoints, deterministic prompts, a plain-text table, a CPU
grid, the vLLM processes' environment.

Only the standard library at module level: the vLLM comparison's driver (bench.peer) imports this and never
needs torch or Ray itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.shard.sampler import SamplingParams
    from cluster.grid import WorkerGrid

ROOT = Path(__file__).resolve().parent.parent
BENCH_MODEL = "models/bench-125m"
CORES = os.cpu_count() or 1
BUDGET = 1024  # engine max_num_batched_tokens: prefill chunk of one step


def ensure_model(path: str, preset: str = "bench-125m", **overrides: Any) -> str:
    """Write a seeded random checkpoint (no tokenizer) at `path` unless one is there; returns the path."""
    from deployments.make_model import write_model

    if not (Path(path) / "config.json").is_file():
        write_model(path, preset=preset, tokenizer=False, **overrides)
    return path


def make_grid(model: str, tp: int = 1, pp: int = 1, kv_mib: int = 512, compiled: bool = False,
              partition: str | list[int] = "even", channel: str = "auto") -> WorkerGrid:
    """A CPU grid whose tp*pp workers split the machine's cores equally (one torch thread at least)."""
    from cluster.config import GridServeConfig
    from cluster.grid import WorkerGrid
    from cluster.placement import create_replica_group

    cfg = GridServeConfig(model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp, resource="CPU",
                          cpus_per_worker=CORES / (tp * pp), max_model_len=512, max_num_batched_tokens=BUDGET,
                          kv_cache_memory_bytes=kv_mib * 2**20, compiled_graph=compiled,
                          pipeline_layer_partition=partition, step_channel=channel)
    return WorkerGrid(cfg, create_replica_group(cfg)[0], owns_group=True)


def greedy() -> SamplingParams:
    """Greedy sampling, what every engine benchmark decodes with."""
    from actors.shard.sampler import SamplingParams

    return SamplingParams(temperature=0.0)


def peer_env(binding: str | None) -> dict[str, str]:
    """Environment of a vLLM process: a small KV cache, caches under .peer/, the chosen thread binding."""
    cache = ROOT / ".peer" / "cache"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": str(cache),
           "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "PYTHONPATH": ""}
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if binding is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = binding
    return env


def model_info(path: str) -> str:
    """Short description of a checkpoint: hidden size, layers, vocabulary, parameters."""
    c = json.loads((Path(path) / "config.json").read_text())
    h, n, v, i = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    params = 2 * v * h + n * (2 * h * h + 2 * h * kv + 3 * h * i)
    size = f"{params / 1e6:.0f}M" if params >= 1e6 else f"{params / 1e3:.0f}K"
    return f"{Path(path).name} (hidden {h}, {n} layers, vocab {v}, ~{size} params, fp32)"


def prompts(n: int, length: int, model: str) -> list[list[int]]:
    """`n` distinct deterministic prompts of `length` token ids inside the model's vocabulary."""
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    return [[(7 * i + 13 * r + 3) % (vocab - 10) + 10 for i in range(length)] for r in range(n)]


def table(title: str, headers: list[str], rows: list[list[Any]], notes: list[str] = ()) -> None:
    """Print one right-aligned table with its title and footnotes."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n## {title}")
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for note in notes:
        print(f"  {note}")


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def settle(max_s: float = 90.0, window_s: float = 2.0, idle_share: float = 0.9) -> tuple[float, float]:
    """Wait until the cores are idle for two windows in a row (what a stopped engine left behind, such as its
    memory being handed back, has finished), at most `max_s`; returns (seconds waited, last window's idle share)."""
    start, calm, share = time.monotonic(), 0, 0.0
    if not Path("/proc/stat").exists():
        return 0.0, share
    while time.monotonic() - start < max_s and calm < 2:
        idle0, total0 = _cpu_times()
        time.sleep(window_s)
        idle1, total1 = _cpu_times()
        share = (idle1 - idle0) / max(1, total1 - total0)
        calm = calm + 1 if share >= idle_share else 0
    return time.monotonic() - start, share


def cpu_snapshot(sessions: set[int]) -> tuple[int, int, dict[int, int]]:
    """(busy, total) jiffies of all cores since boot and, by pid, the CPU jiffies of every live process in one
    of `sessions` (a server started in its own session keeps Ray's and vLLM's processes in it)."""
    idle, total = _cpu_times()
    ours = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
            except OSError:
                continue  # exited meanwhile
            if int(f[3]) in sessions:
                ours[int(d.name)] = int(f[11]) + int(f[12])  # utime + stime
    return total - idle, total, ours


def foreign_cores(before: tuple[int, int, dict[int, int]], after: tuple[int, int, dict[int, int]]) -> float:
    """Cores kept busy between two snapshots by processes outside the measured sessions (other work on the box)."""
    busy, total = after[0] - before[0], after[1] - before[1]
    ours = sum(j - before[2].get(pid, 0) for pid, j in after[2].items())
    return max(0.0, (busy - ours) / max(1, total / CORES))


def serve_on_bed(bed: Any, doc: dict[str, Any], app: str, config: Path, timeout_s: float = 600) -> None:
    """`serve deploy` the Serve config `doc` onto a host bed (tests/hostbed.py), written to `config`, and wait
    until its application `app` runs."""
    config.write_text(json.dumps(doc))
    serve = Path(sys.executable).with_name("serve")
    subprocess.run([str(serve), "deploy", str(config), "-a", bed.dashboard_url], env=bed.env(), check=True,
                   capture_output=True, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = bed.api("/api/serve/applications/").get("applications", {}).get(app, {})
        if status.get("status") == "RUNNING":
            return
        if status.get("status") == "DEPLOY_FAILED":
            raise RuntimeError(f"the app {app!r} failed to deploy: {status.get('message')}")
        time.sleep(2)
    raise TimeoutError(f"the app {app!r} was not RUNNING after {timeout_s:.0f} s")
