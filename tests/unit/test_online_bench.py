"""The online comparison's plan and report (bench.online_shapes, bench.online_report): no server, no vLLM."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import peer_online
from bench.online_report import SHIPPED, best_of_rounds, reference, targets
from bench.online_shapes import MAX_LEN, SHAPES, client_args, mixed_lengths, plan_runs


def test_mixed_lengths_are_seeded_and_clipped() -> None:
    """Same seed, same lengths; every length within [4, MAX_LEN // 2]; means near the intended ~200 / ~190."""
    a = mixed_lengths(SHAPES["mixed"], 4000, seed=7)
    assert a == mixed_lengths(SHAPES["mixed"], 4000, seed=7)
    assert all(4 <= n <= MAX_LEN // 2 for pair in a for n in pair)
    assert 150 < sum(i for i, _ in a) / len(a) < 260 and 140 < sum(o for _, o in a) / len(a) < 240


def test_runs_never_share_a_seed_within_a_server_start() -> None:
    """Distinct seeds per (shape, conc) keep prefix caches from hitting across runs; --quick runs 1 client once."""
    shapes = [SHAPES[n] for n in ("short", "long-prompt", "mixed")]
    runs = plan_runs(shapes, [1, 4, 16, 32], quick=True, round_no=0)
    assert len({r.seed for r in runs}) == len(runs)
    assert [(r.shape.name, r.conc) for r in runs if r.conc == 1] == [("short", 1)]
    assert {r.seed for r in runs}.isdisjoint(r.seed for r in plan_runs(shapes, [1, 4, 16, 32], True, 1))


def test_client_args_pick_the_dataset_by_shape() -> None:
    """Fixed shapes use vllm's random dataset, the mixed one a custom JSONL with per-line output lengths."""
    fixed = client_args(plan_runs([SHAPES["short"]], [4], False, 0)[0], "http://x", "m", "tok", "d.jsonl")
    mixed = client_args(plan_runs([SHAPES["mixed"]], [4], False, 0)[0], "http://x", "m", "tok", "d.jsonl")
    assert fixed[fixed.index("--dataset-name") + 1] == "random" and "--goodput" in fixed
    assert mixed[mixed.index("--custom-output-len") + 1] == "-1" and "d.jsonl" in mixed


def row(server: str, engine: str, tok_s: float, loaded: bool = False, **kw: Any) -> dict[str, Any]:
    """One measured run as bench.peer_online records it."""
    return {"server": server, "engine": engine, "binding": kw.pop("binding", "-"), "group": "smol", "order": 0,
            "shape": "short", "conc": kw.pop("conc", 16), "loaded": loaded, "foreign_cores": 0.0, "completed": 8,
            "failed": 0, "output_throughput": tok_s, "median_ttft_ms": kw.pop("ttft", 100.0),
            "median_tpot_ms": kw.pop("tpot", 50.0), "p99_itl_ms": 80.0, "request_throughput": 1.0, **kw}


def test_best_round_is_the_fastest_quiet_one_and_the_faster_binding_is_the_reference() -> None:
    """A loaded round never wins over a quiet one; the reference is vLLM's faster binding."""
    folder = SHIPPED[-1]  # the shipped config on the fp32 folder
    rows = [row("vLLM auto", "vllm", 90.0, binding="auto"), row("vLLM 0-1", "vllm", 150.0, binding="0-1"),
            row(folder, "gridserve", 200.0, loaded=True), row(folder, "gridserve", 120.0)]
    best = best_of_rounds(rows)
    assert best[("smol", folder, "short", 16)]["output_throughput"] == 120.0
    assert reference(best, "smol", "short", 16)["binding"] == "0-1"
    lines = "\n".join(targets(best, ["short"], None))
    assert "**NOT met**: short @ 16: tok/s 0.80x" in lines and "**met**: short @ 16: TTFT 1.00x" in lines
    assert "not measured: short @ 4" in lines


def test_targets_read_the_bundled_gguf_row_where_it_ran() -> None:
    """ray_config.yaml ships on its GGUF: that row is the one the targets judge, the folder's only without it."""
    rows = [row("vLLM 0-1", "vllm", 150.0, binding="0-1"), row(SHIPPED[-1], "gridserve", 120.0),
            row(SHIPPED[0], "gridserve", 165.0)]
    lines = "\n".join(targets(best_of_rounds(rows), ["short"], None))
    assert "**met**: short @ 16: tok/s 1.10x" in lines


def test_the_tiny_row_serves_the_shipped_config_beside_the_base(monkeypatch: Any, tmp_path: Path) -> None:
    """With only the bundled-GGUF layout asked, the tiny model (no GGUF of its own) still gets the shipped config's
    row, and `--base` a row of its own on the tiny model too."""
    monkeypatch.setattr(peer_online, "ensure_tiny", lambda: tmp_path / "tiny")
    monkeypatch.setattr(peer_online, "OUT", tmp_path)  # where each server's config is written
    base = tmp_path / "base"
    base.mkdir()
    (base / "ray_config.yaml").write_text((peer_online.ROOT / "ray_config.yaml").read_text())
    order = peer_online.servers(Path("python"), ["gguf"], ["0-1", "auto"], [], [], [16], base)
    assert [(s.label, s.group) for s in order] == [
        ("vLLM 0-1", "tiny"), ("vLLM auto", "tiny"), ("gridserve shipped", "tiny"),
        ("gridserve@base shipped", "tiny")]
    assert order[-1].cwd == base.resolve()
