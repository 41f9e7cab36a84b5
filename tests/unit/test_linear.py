"""The CPU matmuls behind every parallel layer (C few-token and many-token kernels, split GEMV) equal `F.linear`, on
and off their fast paths, and each size takes the path meant for it."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from actors.shard import layers, native
from actors.shard.layers import GEMM_MAX_TOKENS, GEMV_MAX_TOKENS, SPLIT_MAX_TOKENS, linear


@pytest.fixture
def threads() -> Iterator[None]:
    """Run with 2 torch threads (the split's trigger), restoring the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("tokens", [1, 3, GEMV_MAX_TOKENS + 1, 64, SPLIT_MAX_TOKENS, SPLIT_MAX_TOKENS + 1])
@pytest.mark.parametrize("rows", [96, 97])  # 97 rows cannot be cut in two: the plain path
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(threads: None, tokens: int, rows: int, bias: bool) -> None:
    """Same values as F.linear for every size the split takes or declines."""
    torch.manual_seed(tokens + rows)
    x, w = torch.randn(tokens, 80), torch.randn(rows, 80)
    b = torch.randn(rows) if bias else None
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_linear_takes_the_split_path_without_the_c_kernels(threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C kernels, decode sizes go through one batched matmul and prefill sizes through F.linear."""
    monkeypatch.setattr(layers.native, "matmuls_available", lambda: False)
    calls: list[str] = []
    real_bmm, real_linear = torch.bmm, F.linear
    monkeypatch.setattr(layers.torch, "bmm", lambda *a: calls.append("bmm") or real_bmm(*a))
    monkeypatch.setattr(layers.F, "linear", lambda *a: calls.append("linear") or real_linear(*a))
    linear(torch.randn(GEMV_MAX_TOKENS + 1, 16), torch.randn(32, 16))
    linear(torch.randn(SPLIT_MAX_TOKENS + 1, 16), torch.randn(32, 16))
    assert calls == ["bmm", "linear"]


def check_kernel(kernel: Callable[..., torch.Tensor], tokens: int, rows: int, cols: int, num_threads: int) -> None:
    """`kernel` (native.gemv or native.gemm) on random [tokens, cols] x [rows, cols] with and without bias, on
    `num_threads` threads (small weights too), gives F.linear's values."""
    assert native.matmuls_available(), "the C kernels must build on this machine (gcc with AVX2 + FMA)"
    g = torch.Generator().manual_seed(tokens * 1000 + rows + cols)
    x, w = torch.randn(tokens, cols, generator=g), torch.randn(rows, cols, generator=g)
    b = torch.randn(rows, generator=g)
    before, threaded = torch.get_num_threads(), native.GEMV_THREADED_MIN
    torch.set_num_threads(num_threads)
    native.GEMV_THREADED_MIN = 0  # small test weights take the threaded split too
    try:
        got, plain = kernel(x, w, b), kernel(x, w)
    finally:
        torch.set_num_threads(before)
        native.GEMV_THREADED_MIN = threaded
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(plain, F.linear(x, w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("rows,cols", [(1, 8), (3, 7), (4, 16), (13, 77), (97, 80), (256, 771)])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_gemv_matches_f_linear(tokens: int, rows: int, cols: int, num_threads: int) -> None:
    """The C kernel's every branch (pairs of tokens and a lone one, blocks of four rows and leftover rows, columns
    past the last eight, one or two threads) gives F.linear's values, bias included."""
    check_kernel(native.gemv, tokens, rows, cols, num_threads)


@pytest.mark.parametrize("tokens", [5, 8, 9, 16, 17, 40, 300])
@pytest.mark.parametrize("rows,cols", [(1, 8), (5, 3), (13, 77), (25, 96), (97, 80), (256, 771)])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_gemm_matches_f_linear(tokens: int, rows: int, cols: int, num_threads: int) -> None:
    """The many-token kernel's every branch (tiles of 8 and 16 tokens and a padded last one, blocks of 12 and 6 rows
    and leftover rows, several token panels at 300 x 771, one or two threads) gives F.linear's values, bias
    included."""
    check_kernel(native.gemm, tokens, rows, cols, num_threads)


def test_linear_takes_each_c_kernel_at_its_token_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 CPU steps of up to GEMV_MAX_TOKENS go through native.gemv, up to GEMM_MAX_TOKENS through native.gemm;
    longer steps, or another dtype, through neither."""
    calls: list[tuple[str, int]] = []
    for name in ("gemv", "gemm"):
        real = getattr(native, name)
        monkeypatch.setattr(layers.native, name,
                            lambda x, *a, _n=name, _f=real: calls.append((_n, x.shape[0])) or _f(x, *a))
    w = torch.randn(32, 16)
    for tokens in (1, GEMV_MAX_TOKENS, GEMV_MAX_TOKENS + 1, GEMM_MAX_TOKENS, GEMM_MAX_TOKENS + 1):
        linear(torch.randn(tokens, 16), w)
    linear(torch.randn(1, 16, dtype=torch.float64), w.double())
    linear(torch.randn(8, 16, dtype=torch.float64), w.double())
    assert calls == [("gemv", 1), ("gemv", GEMV_MAX_TOKENS), ("gemm", GEMV_MAX_TOKENS + 1),
                     ("gemm", GEMM_MAX_TOKENS)]
