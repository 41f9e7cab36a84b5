"""Matmul timings kept across worker starts: each start plans on the least time every start has seen."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.shard import matmul_plan, plan_times


def test_each_path_keeps_its_least_time_per_bucket(tmp_path: Path) -> None:
    store = tmp_path / "plans" / "times.json"
    assert plan_times.merged("w", {"gemm": [3.0, 1.0], "torch": [2.0, 2.0]}, store) == {
        "gemm": [3.0, 1.0], "torch": [2.0, 2.0]}
    got = plan_times.merged("w", {"gemm": [2.0, 5.0], "torch": [4.0, 1.5], "quant": [0.5, 0.5]}, store)
    assert got == {"gemm": [2.0, 1.0], "torch": [2.0, 1.5], "quant": [0.5, 0.5]}  # a new path: its own times
    assert json.loads(store.read_text())["w"] == got
    assert plan_times.merged("other", {"gemm": [9.0]}, store) == {"gemm": [9.0]}  # entries apart
    assert plan_times.merged("w", {"gemm": [7.0]}, store) == {"gemm": [7.0]}  # other buckets: not comparable


def test_a_broken_store_leaves_this_starts_times(tmp_path: Path) -> None:
    bad = tmp_path / "times.json"
    bad.write_text("{not json")
    assert plan_times.merged("w", {"gemm": [1.0]}, bad) == {"gemm": [1.0]}
    assert json.loads(bad.read_text()) == {"w": {"gemm": [1.0]}}  # rewritten whole
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert plan_times.merged("w", {"gemm": [1.0]}, blocked / "times.json") == {"gemm": [1.0]}  # no folder there


def test_the_plan_follows_the_remembered_times() -> None:
    """Whatever this start measured, the remembered figures decide; untimed large buckets follow the last winner."""
    def torch_fastest(times: dict) -> dict:
        return {p: [0.0 if p == "torch" else 1.0] * len(t) for p, t in times.items()}

    paths = matmul_plan.candidates(packed=False)
    plan = matmul_plan.calibrate(64, 96, paths, (1, 4, 16), remember=torch_fastest)
    assert plan.paths == ("torch", "torch", "torch")

    def gemv_fastest(times: dict) -> dict:
        return {p: [0.0 if p == "gemv" else 1.0] * len(t) for p, t in times.items()}

    if "gemv" in paths:
        huge = matmul_plan.MAX_CALL_FLOP  # a bucket this large is not timed: it runs PyTorch's GEMM, not gemv
        plan = matmul_plan.calibrate(64, 96, paths, (1, int(huge)), remember=gemv_fastest)
        assert plan.paths == ("gemv", "torch")


def test_the_store_is_per_machine_and_code() -> None:
    path = plan_times.store_path()
    assert path.parent.name == "plans" and path.name.startswith("matmul-times-")


def test_read_floors_charge_each_path_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached fp32 timing below what reading its weight from memory takes loses to blocks of 1/6 the bytes;
    fp32 paths tied at the floor keep their timed order."""
    monkeypatch.setattr(plan_times, "read_bandwidth", lambda: 1e9)  # 1 GB/s: 6 MB take 6 ms, 1 MB 1 ms
    times = {"gemm": [0.002, 0.020], "torch": [0.003, 0.030], "quant": [0.004, 0.040]}
    floored = matmul_plan.read_floors(times, 6_000_000, 1_000_000)
    assert matmul_plan.choose(floored, (1, 64)).paths == ("quant", "gemm")
    assert floored["gemm"][0] < floored["torch"][0]
