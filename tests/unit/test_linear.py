"""The CPU split matmul behind every parallel layer equals `F.linear`, on and off its fast path."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from actors.shard import layers
from actors.shard.layers import SPLIT_MAX_TOKENS, linear


@pytest.fixture
def threads() -> Iterator[None]:
    """Run with 2 torch threads (the split's trigger), restoring the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("tokens", [1, 3, 64, SPLIT_MAX_TOKENS, SPLIT_MAX_TOKENS + 1])
@pytest.mark.parametrize("rows", [96, 97])  # 97 rows cannot be cut in two: the plain path
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(threads: None, tokens: int, rows: int, bias: bool) -> None:
    """Same values as F.linear for every size the split takes or declines."""
    torch.manual_seed(tokens + rows)
    x, w = torch.randn(tokens, 80), torch.randn(rows, 80)
    b = torch.randn(rows) if bias else None
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_linear_takes_the_split_path_at_decode_sizes(threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """At decode sizes the work goes through one batched matmul, not F.linear (so the fast path is exercised)."""
    calls: list[str] = []
    real_bmm, real_linear = torch.bmm, F.linear
    monkeypatch.setattr(layers.torch, "bmm", lambda *a: calls.append("bmm") or real_bmm(*a))
    monkeypatch.setattr(layers.F, "linear", lambda *a: calls.append("linear") or real_linear(*a))
    linear(torch.randn(4, 16), torch.randn(32, 16))
    linear(torch.randn(SPLIT_MAX_TOKENS + 1, 16), torch.randn(32, 16))
    assert calls == ["bmm", "linear"]
