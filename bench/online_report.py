"""Tables and target check of `bench.peer --parts online`: best of rounds per (server, shape, concurrency), each
row against the faster of vLLM's two thread bindings, written as markdown (printed too) beside the raw JSON.
"""
from __future__ import annotations

from typing import Any

LOADED_CORES = 0.2  # other work took more than this many cores during a run: the row is labelled, not used
# the rows issue 28's targets are about: ray_config.yaml as it ships (on its bundled GGUF where that row ran,
# else on the fp32 folder vLLM loads)
SHIPPED = ("gridserve shipped, bundled GGUF", "gridserve shipped")


def usable(row: dict[str, Any]) -> bool:
    """A run that finished every request."""
    return "error" not in row and not row.get("failed") and row.get("completed", 0) > 0


def best_of_rounds(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """Per (group, server, shape, conc), the round with the most output tok/s among the runs on a quiet box (among
    the loaded ones only when every round was loaded; then the row stays labelled loaded)."""
    keyed: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["group"], r["server"], r["shape"], r["conc"]), []).append(r)
    best = {}
    for key, runs in keyed.items():
        good = [r for r in runs if usable(r)]
        quiet = [r for r in good if not r["loaded"]]
        pool = quiet or good
        best[key] = max(pool, key=lambda r: r["output_throughput"]) if pool else runs[-1]
    return best


def reference(best: dict[tuple[str, str, str, int], dict[str, Any]], group: str, shape: str,
              conc: int) -> dict[str, Any] | None:
    """The faster vLLM binding's row at this (group, shape, conc), or None if neither finished."""
    peers = [r for (g, _, s, c), r in best.items() if (g, s, c) == (group, shape, conc)
             and r["engine"] == "vllm" and usable(r)]
    return max(peers, key=lambda r: r["output_throughput"]) if peers else None


def ratios(row: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, float | None]:
    """tok/s (higher is better), TTFT p50, TPOT p50 and ITL p99 (lower is better) over the reference's."""
    keys = {"tok/s": "output_throughput", "TTFT": "median_ttft_ms", "TPOT": "median_tpot_ms", "ITL99": "p99_itl_ms"}
    if ref is None or not usable(row):
        return dict.fromkeys(keys)
    return {k: row[f] / ref[f] if ref[f] else None for k, f in keys.items()}


def fmt(x: Any, digits: int = 1) -> str:
    """A cell: numbers rounded, None as a dash."""
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def shape_table(best: dict, group: str, shape: str, title: str) -> list[str]:
    """Markdown table of one shape: every server at every concurrency, ratios to the faster vLLM."""
    lines = [f"### {title}", "", "| server | bind | conc | TTFT p50 ms | TPOT p50 ms | ITL p99 ms | out tok/s | "
             "goodput req/s (in SLO) | tok/s x | TTFT x | TPOT x | ITL p99 x | other load | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    rows = sorted((r for (g, _, s, _), r in best.items() if (g, s) == (group, shape)),
                  key=lambda r: (r["conc"], r["order"]))
    for r in rows:
        ref = reference(best, group, shape, r["conc"])
        q = ratios(r, ref)
        note = r.get("error") or (f"{r.get('failed')} failed" if r.get("failed") else "")
        if r["loaded"]:
            note = (note + "; " if note else "") + "LOADED box, not used"
        if ref is not None and r is ref:
            note = (note + "; " if note else "") + "reference"
        good = r.get("request_goodput")
        share = f" ({100 * good / r['request_throughput']:.0f}%)" if good is not None and r.get("request_throughput") \
            else ""
        lines.append("| " + " | ".join([
            r["server"], r["binding"], str(r["conc"]), fmt(r.get("median_ttft_ms"), 0), fmt(r.get("median_tpot_ms")),
            fmt(r.get("p99_itl_ms"), 0), fmt(r.get("output_throughput")), fmt(good, 2) + share,
            *(fmt(q[k], 2) for k in ("tok/s", "TTFT", "TPOT", "ITL99")), f"{r['foreign_cores']:.2f}", note]) + " |")
    return lines + [""]


def check(best: dict, group: str, shape: str, conc: int, key: str, limit: float,
          higher: bool) -> tuple[str, str]:
    """(status, detail) of one target on the shipped row: met, NOT met, loaded or not measured."""
    row = next((best[k] for k in ((group, label, shape, conc) for label in SHIPPED) if k in best), None)
    ref = reference(best, group, shape, conc)
    if row is None or ref is None or not usable(row):
        return "not measured", f"{shape} @ {conc}: {key}"
    value = ratios(row, ref)[key]
    sign = ">=" if higher else "<="
    detail = f"{shape} @ {conc}: {key} {value:.2f}x (limit {sign} {limit}, vs vLLM {ref['binding']})"
    if row["loaded"] or ref["loaded"]:
        return "loaded, not used", detail
    ok = value >= limit if higher else value <= limit
    return ("met" if ok else "NOT met"), detail


def targets(best: dict, shapes: list[str], tiny: str | None) -> list[str]:
    """Issue 28's targets, one line each, for the shipped config on every shape measured."""
    goals = []
    for s in shapes:
        goals += [("smol", s, c, "tok/s", 1.0, True) for c in (4, 16, 32)]
        goals += [("smol", s, 16, "TTFT", 1.0, False), ("smol", s, 16, "TPOT", 1.0, False),
                  ("smol", s, 32, "ITL99", 1.5, False), ("smol", s, 1, "TPOT", 1.1, False)]
    if tiny:
        goals += [("tiny", tiny, 16, "tok/s", 1.0, True), ("tiny", tiny, 16, "ITL99", 1.5, False)]
    results = [check(best, *g) for g in goals]
    met = sum(st == "met" for st, _ in results)
    counted = sum(st in ("met", "NOT met") for st, _ in results)
    lines = ["### Issue 28 targets (gridserve shipped vs the faster vLLM binding)", "",
             f"{met} of {counted} measured targets met ({len(results) - counted} not measured or loaded).", ""]
    return lines + [f"- **{st}**: {detail}" for st, detail in results if st != "not measured"] + [
        f"- not measured: {detail}" for st, detail in results if st == "not measured"] + [""]
