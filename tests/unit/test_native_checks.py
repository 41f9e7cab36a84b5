"""Every C kernel wrapper refuses a wrong argument with a ValueError naming it, before anything reaches C."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from actors.shard import native
from actors.shard.kv_cache import PagedKVCache

pytestmark = pytest.mark.skipif(not native.available(), reason="the C kernels did not build here")

X, W, B = torch.randn(3, 8), torch.randn(8, 8), torch.randn(8)
META = torch.empty(3, 8, device="meta")  # a tensor off the CPU, on any machine


def matmul_cases(fn: Callable[..., torch.Tensor]) -> list[tuple[Callable[[], object], str]]:
    """Bad calls of gemv or gemm and the message each must raise."""
    return [
        (lambda: fn(X.double(), W), r"x is a 2-D torch.float64 tensor on cpu; expected a 2-D torch.float32"),
        (lambda: fn(META, W), r"x is a 2-D torch.float32 tensor on meta; expected .* on cpu"),
        (lambda: fn(X[0], W), r"x is a 1-D .*; expected a 2-D"),
        (lambda: fn(X.tolist(), W), r"x is a list; expected a torch.float32 CPU tensor"),
        (lambda: fn(X, W.half()), r"weight is a 2-D torch.float16"),
        (lambda: fn(X, W.t()), r"weight of shape \(8, 8\) has strides \(1, 8\); expected a contiguous"),
        (lambda: fn(X, torch.randn(8, 5)), r"x is \(3, 8\) and weight \(8, 5\); expected .* the same in"),
        (lambda: fn(torch.randn(3, 0), torch.randn(8, 0)), r"x is \(3, 0\) .* at least 1"),
        (lambda: fn(X, W, torch.randn(7)), r"bias is \(7,\) for weight \(8, 8\); expected bias of shape \(8,\)"),
        (lambda: fn(X, W, B.double()), r"bias is a 1-D torch.float64"),
        (lambda: fn(X, W, torch.randn(16)[::2]), r"bias of shape \(8,\) has strides \(2,\)"),
    ]


@pytest.mark.parametrize("name", ["gemv", "gemm"])
def test_matmuls_refuse_wrong_arguments(name: str) -> None:
    """dtype, device, dimensions, contiguity of the weight and bias, and shapes that must agree."""
    fn = getattr(native, name)
    for call, message in matmul_cases(fn):
        with pytest.raises(ValueError, match=f"^{name}: {message}"):
            call()


@pytest.mark.parametrize("name", ["gemv", "gemm"])
def test_matmuls_copy_a_strided_x(name: str) -> None:
    """A strided activation is fine (copied once); only weights must come contiguous."""
    x = torch.randn(8, 6)[:, :4].t()  # [4, 8] with strides (1, 6)
    w = torch.randn(5, 8)
    torch.testing.assert_close(getattr(native, name)(x, w), x @ w.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda: native.rms_norm(X.double(), B, 1e-5), r"x is a 2-D torch.float64 tensor on cpu"),
    (lambda: native.rms_norm(META, B, 1e-5), r"x is a 2-D torch.float32 tensor on meta"),
    (lambda: native.rms_norm(torch.tensor(1.0), B, 1e-5), r"x is \(\) and weight \(8,\)"),
    (lambda: native.rms_norm(X, W, 1e-5), r"weight is a 2-D .*; expected a 1-D"),
    (lambda: native.rms_norm(X, torch.randn(7), 1e-5), r"x is \(3, 8\) and weight \(7,\); expected x \[..., n\]"),
    (lambda: native.rms_norm(X, torch.randn(16)[::2], 1e-5), r"weight of shape \(8,\) has strides \(2,\)"),
    (lambda: native.rms_norm(X, B, -1.0), r"eps is -1.0; expected a number >= 0"),
    (lambda: native.rms_norm(X, B, float("nan")), r"eps is nan"),
])
def test_rms_norm_refuses_wrong_arguments(call: Callable[[], object], message: str) -> None:
    """dtype, device, dimensions, the weight's length and contiguity, and eps."""
    with pytest.raises(ValueError, match=f"^rms_norm: {message}"):
        call()


CACHE = PagedKVCache(1, 4, 4, 2, 8, torch.float32, torch.device("cpu"))  # 4 blocks of 4 slots, 2 KV heads, d 8
K, V = CACHE.k[0], CACHE.v[0]
Q, TABLES, LENS = torch.randn(1, 4, 8), torch.tensor([[1, 2]]), torch.tensor([6])


def decode(**changes: object) -> torch.Tensor:
    """paged_decode on a valid call with `changes` to its arguments."""
    args = {"q": Q, "k": K, "v": V, "tables": TABLES, "lens": LENS, "block_size": 4, "window": None,
            "scale": 0.5, **changes}
    return native.paged_decode(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("changes,message", [
    ({"q": Q.double()}, r"q is a 3-D torch.float64 tensor on cpu"),
    ({"q": Q[0]}, r"q is a 2-D .*; expected a 3-D"),
    ({"k": torch.empty(2, 16, 8, device="meta")}, r"k is a 3-D torch.float32 tensor on meta"),
    ({"v": V.double()}, r"v is a 3-D torch.float64"),
    ({"tables": TABLES.int()}, r"tables is a 2-D torch.int32 .*; expected a 2-D torch.int64"),
    ({"lens": LENS[0]}, r"lens is a 0-D .*; expected a 1-D torch.int64"),
    ({"v": V[:, :8]}, r"k is \(2, 16, 8\) .* and v \(2, 8, 8\)"),
    ({"k": K.transpose(1, 2).contiguous().transpose(1, 2)}, r"k is \(2, 16, 8\) with strides \(128, 1, 16\)"),
    ({"q": torch.randn(1, 4, 6)}, r"q is \(1, 4, 6\) and k \(2, 16, 8\); expected .* the same d"),
    ({"q": torch.randn(1, 3, 8)}, r"q is \(1, 3, 8\) .* heads a multiple of kv_heads"),
    ({"tables": torch.tensor([[1, 2], [0, 3]])}, r"q is .*, tables \(2, 2\) and lens \(1,\); expected one table row"),
    ({"lens": torch.tensor([6, 6])}, r"q .* and lens \(2,\); expected one table row and one length per sequence \(1\)"),
    ({"block_size": 0}, r"block_size is 0; expected a divisor of the cache's 16 slots"),
    ({"block_size": 5}, r"block_size is 5"),
    ({"window": 0}, r"window is 0; expected None \(full context\) or at least 1"),
    ({"lens": torch.tensor([9])}, r"lens\[0\] is 9; expected 1..8 \(its table's 2 blocks of 4 tokens\)"),
    ({"lens": torch.tensor([0])}, r"lens\[0\] is 0"),
    ({"tables": torch.tensor([[1, 4]])}, r"tables\[0, 1\] is 4; expected a block id in 0..3"),
    ({"tables": torch.tensor([[-1, 2]])}, r"tables\[0, 0\] is -1"),
])
def test_paged_decode_refuses_wrong_arguments(changes: dict[str, object], message: str) -> None:
    """dtype, device, dimensions, cache layout, shapes that must agree, block size, window, lengths and block ids
    (the last two checked in C, before any key is read)."""
    with pytest.raises(ValueError, match=f"^paged_decode: {message}"):
        decode(**changes)


def test_paged_decode_reads_only_the_blocks_it_needs() -> None:
    """Padding past a sequence's last block is not a block id, and a strided q is copied: the call succeeds."""
    out = decode(tables=torch.tensor([[1, 2, -1, 99]]), q=torch.randn(1, 6, 8)[:, :4])
    assert out.shape == (1, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("call", [lambda: native.gemv(X, W), lambda: native.gemm(X, W),
                                  lambda: native.rms_norm(X, B, 1e-5), lambda: decode()])
def test_a_thread_count_below_one_is_refused(monkeypatch: pytest.MonkeyPatch, call: Callable[[], object]) -> None:
    """The OpenMP thread count each wrapper passes is checked too."""
    monkeypatch.setattr(native, "GEMV_THREADED_MIN", 0)
    monkeypatch.setattr(native.torch, "get_num_threads", lambda: 0)
    with pytest.raises(ValueError, match=r"the thread count is 0; expected at least 1"):
        call()
