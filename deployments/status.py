"""`gridserve status`: each replica's grid (stage x TP rank -> node, device, memory, busy %, all-reduce %) with
balance flags, read from the endpoint's `/status`; optionally a PNG chart of the grid."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cluster.metrics import status_table

PLOT_INSTALL = "pip install 'gridserve[plot]'"


def plotting_available() -> bool:
    """Whether matplotlib (the `plot` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def collect(url: str, api_key: str | None, samples: int) -> list[dict[str, Any]]:
    """Ask `/status` `samples` times (Serve spreads the calls over replicas); one snapshot per replica seen."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    seen: dict[str, dict[str, Any]] = {}
    with httpx.Client(timeout=30) as http:
        for _ in range(samples):
            r = http.get(f"{url.rstrip('/')}/status", headers=headers)
            if r.status_code != 200:
                raise ValueError(f"GET {url}/status answered HTTP {r.status_code}: {r.text[:300]}")
            st = r.json()
            seen[st["replica"]] = st
    return list(seen.values())


def chart(statuses: list[dict[str, Any]], out: Path) -> None:
    """One heat map per replica: busy % per (stage, TP rank) cell, annotated with memory and all-reduce %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(statuses), figsize=(4 * len(statuses), 3.5), squeeze=False)
    for ax, st in zip(axes[0], statuses):
        grid = [[0.0] * st["tp"] for _ in range(st["pp"])]
        for w in st["workers"]:
            grid[w["pp_rank"]][w["tp_rank"]] = w["busy_pct"]
            ax.text(w["tp_rank"], w["pp_rank"], f"{w['busy_pct']:.0f}% busy\n"
                    f"{(w['weight_bytes'] + w['kv_bytes']) / 2**20:.0f} MiB\nAR {w['allreduce_pct']:.0f}%",
                    ha="center", va="center", fontsize=8)
        ax.imshow(grid, cmap="Greens", vmin=0, vmax=100)
        ax.set_title(f"replica {st['replica']}", fontsize=9)
        ax.set_xlabel("TP rank")
        ax.set_ylabel("pipeline stage")
        ax.set_xticks(range(st["tp"]))
        ax.set_yticks(range(st["pp"]))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog="gridserve status", description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the Serve endpoint")
    ap.add_argument("--api-key", help="if the server was started with api_key")
    ap.add_argument("--samples", type=int, default=8, help="/status calls made to find every replica")
    ap.add_argument("--png", type=Path, help="also write a chart of the grid(s) here (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.png and not plotting_available():
        print(f"gridserve status: --png needs matplotlib, which is not installed; run: {PLOT_INSTALL}", file=sys.stderr)
        return 2
    try:
        statuses = collect(args.url, args.api_key, max(1, args.samples))
    except (ValueError, OSError) as exc:
        print(f"gridserve status: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # httpx connection errors: say where we looked
        print(f"gridserve status: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    print("\n\n".join(status_table(st) for st in sorted(statuses, key=lambda s: s["replica"])))
    if args.png:
        chart(statuses, args.png)
        print(f"chart written to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
