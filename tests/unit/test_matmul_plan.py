"""The timed CPU matmul plan: buckets, the winner per bucket, every path's product, what 'auto' packs and keeps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actors.shard import cpu_gemm, matmul_plan
from actors.shard.layers import linear
from actors.shard.matmul_plan import MatmulPlan, Path, choose
from tests.unit.test_cpu_gemm import Tied

BOUNDS = (1, 2, 4, 8)


def test_a_token_count_runs_its_buckets_path_and_larger_counts_the_last() -> None:
    plan = MatmulPlan(BOUNDS, ("torch", "gemv", "gemv", "packed"))
    assert [plan.path(t) for t in (1, 2, 3, 4, 5, 8, 9, 4096)] == \
        ["torch", "gemv", "gemv", "gemv", "packed", "packed", "packed", "packed"]
    assert plan.describe() == "1 torch, 2-4 gemv, 5-8+ packed"
    assert plan.needs_packed and plan.needs_plain
    assert not MatmulPlan(BOUNDS, ("packed",) * 4).needs_plain


def test_each_bucket_takes_its_fastest_path() -> None:
    times: dict[Path, list[float]] = {"gemm": [1.0, 1.0, 3.0, 5.0], "packed": [2.0, 0.5, 2.0, 6.0],
                                      "torch": [3.0, 3.0, 1.0, 4.0]}
    assert choose(times, BOUNDS).paths == ("gemm", "packed", "torch", "torch")


@pytest.mark.parametrize("threads", [1, 2])
def test_calibration_names_only_paths_this_build_runs(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        paths = matmul_plan.candidates(packed=True)
        plan = matmul_plan.calibrate(64, 96, paths, BOUNDS)
    finally:
        torch.set_num_threads(2)
    assert plan.bounds == BOUNDS and set(plan.paths) <= set(paths)
    assert ("split" in paths) == (threads > 1)


@pytest.mark.parametrize("path", ["gemv", "gemm", "packed", "split", "torch"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_every_path_gives_f_linears_product(path: Path, tokens: int) -> None:
    if path not in matmul_plan.candidates(packed=True):
        pytest.skip(f"{path} is not built here")
    g = torch.Generator().manual_seed(tokens)
    x, w, b = torch.randn(tokens, 96, generator=g), torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    packed = cpu_gemm.pack(w) if path == "packed" else None
    plan = MatmulPlan((1,), (path,))
    torch.testing.assert_close(linear(x, w, b, packed, plan), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_a_plan_path_whose_copy_is_missing_falls_back_to_the_one_that_exists() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 96, generator=g), torch.randn(80, 96, generator=g)
    want = F.linear(x, w)
    torch.testing.assert_close(linear(x, w, None, None, MatmulPlan((1,), ("packed",))), want)  # never packed
    packed = cpu_gemm.pack(w)
    if packed is not None:  # the plain copy freed: oneDNN's is the only one
        torch.testing.assert_close(linear(x, w.new_empty(0), None, packed, MatmulPlan((1,), ("torch",))), want,
                                   rtol=1e-5, atol=1e-4)


def fixed(paths: tuple[Path, ...]) -> object:
    """A stand-in for the timing: the plan `paths` whatever the machine."""
    return lambda hidden, rows, candidates, threads, qtype: MatmulPlan(BOUNDS, paths)


@pytest.mark.skipif(not cpu_gemm.available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize(("paths", "packed", "plain_kept"), [
    (("gemv", "gemm", "gemm", "torch"), False, True),  # oneDNN won nowhere: nothing packed
    (("gemv", "packed", "packed", "packed"), True, True),  # both copies used
    (("packed",) * 4, True, False),  # only oneDNN's: the plain copy freed (the tied head keeps its own)
])
def test_auto_packs_only_where_the_plan_runs_onednn(monkeypatch: pytest.MonkeyPatch, paths: tuple[Path, ...],
                                                   packed: bool, plain_kept: bool) -> None:
    monkeypatch.setattr(cpu_gemm, "PACK_MIN_ELEMENTS", 1)
    monkeypatch.setattr(matmul_plan, "_calibrated", fixed(paths))
    m = Tied()
    x = torch.randn(20, 16)
    want = m(x)
    plans = matmul_plan.plan_linears(m, "auto")
    assert set(plans) == {(32, 16), (16, 32), (50, 16)}  # each weight shape timed once
    assert m.up.plan is plans[32, 16] and m.down.plan is plans[16, 32] and m.head.plan is plans[50, 16]
    assert (m.up.packed is not None) == packed and (m.up.weight.numel() > 0) == plain_kept
    assert m.head.weight.numel() > 0  # shared with the embedding: never freed
    for tokens in (1, 3, 8, 20):  # each bucket's path, and past the last bound
        torch.testing.assert_close(m(x[:tokens]), want[:tokens], rtol=1e-4, atol=1e-4)


def test_fixed_modes_get_no_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_gemm, "PACK_MIN_ELEMENTS", 1)
    m = Tied()
    assert matmul_plan.plan_linears(m, "plain") == {} and m.up.plan is None and m.up.packed is None


def test_small_weights_keep_the_fixed_paths_untimed() -> None:
    m = Tied()  # weights far below cpu_gemm.PACK_MIN_ELEMENTS (a tiny model's)
    assert matmul_plan.plan_linears(m, "auto") == {} and m.up.plan is None
