"""Process start-up cost: seconds to import what each gridserve process imports first, in a fresh interpreter.

Every worker actor, model replica and ingress replica pays this before it does anything, so it bounds a new
replica's cold start (autoscaling) and every Serve app start in CI. With `--base DIR` a previous checkout is timed
in the same run, alternating, so load on the box hits both.

python -m bench.startup [--rounds 3] [--base DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import table

ENTRIES = {"worker actor": "actors.worker", "model replica (LLMServer)": "deployments.llm_server",
           "ingress replica / serve CLI": "deployments.serve_app"}
PROBE = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def import_seconds(checkout: Path, module: str) -> float:
    """Seconds `import module` takes in a fresh interpreter whose path starts at `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=checkout, env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Alternate the checkouts per round and print the median per entry module."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", type=Path, help="a previous gridserve checkout, timed in the same run")
    args = ap.parse_args()
    checkouts = {"gridserve": Path.cwd()} | ({"previous": args.base.resolve()} if args.base else {})
    seen: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, path in checkouts.items():
            for label, module in ENTRIES.items():
                seen.setdefault((name, label), []).append(import_seconds(path, module))
    rows = []
    for label in ENTRIES:
        now = statistics.median(seen[("gridserve", label)])
        row = [label, ENTRIES[label], now]
        if args.base:
            before = statistics.median(seen[("previous", label)])
            row += [before, before / now]
        rows.append(row)
    headers = ["process", "first import", "gridserve s"] + (["previous s", "speed-up"] if args.base else [])
    table(f"import time, median of {args.rounds} fresh interpreters ({platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f})", headers, rows)


if __name__ == "__main__":
    main()
