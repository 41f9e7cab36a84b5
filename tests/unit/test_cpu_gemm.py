"""oneDNN packed CPU weights: same products as F.linear, which copies stay per mode, tied weights kept."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actors.shard import cpu_gemm, native
from actors.shard.layers import (
    GEMM_MAX_TOKENS,
    GEMV_MAX_TOKENS,
    SPLIT_MAX_TOKENS,
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from actors.shard.tp import TPGroup

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("tokens", [1, 3, 32, 300])
def test_packed_linear_matches_f_linear(tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    x, w, b = torch.randn(tokens, 96, generator=g), torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    packed = cpu_gemm.pack(w)
    assert packed is not None
    torch.testing.assert_close(cpu_gemm.packed_linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_only_large_fp32_cpu_matrices_are_packable() -> None:
    rows = cpu_gemm.PACK_MIN_ELEMENTS // 512
    assert cpu_gemm.packable(torch.zeros(rows, 512))
    assert not cpu_gemm.packable(torch.zeros(rows, 511))  # below the size where packing paid
    assert not cpu_gemm.packable(torch.zeros(rows, 512, dtype=torch.bfloat16))


class Tied(nn.Module):
    """An embedding and a head sharing one weight, plus two plain parallel linears."""

    def __init__(self) -> None:
        super().__init__()
        tp = TPGroup.single()
        self.embed = VocabParallelEmbedding(50, 16, tp, torch.float32)
        self.head = ParallelLMHead(50, 16, tp, torch.float32)
        self.head.weight = self.embed.weight
        self.up = ColumnParallelLinear(16, [32], tp, False, torch.float32)
        self.down = RowParallelLinear(32, 16, tp, True, torch.float32)
        for p in self.parameters():
            p.data.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, 16] -> [T, 50]."""
        return self.head(self.down(self.up(x)))


@pytest.fixture
def small_packable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test's small weights count as packable."""
    monkeypatch.setattr(cpu_gemm, "PACK_MIN_ELEMENTS", 1)


def test_packed_mode_frees_plain_weights_but_keeps_shared_ones(small_packable: None) -> None:
    m, x = Tied(), torch.randn(5, 16)
    want = m(x)
    assert cpu_gemm.pack_linears(m, "packed") == 3  # up, down, head (the embedding has no packed slot)
    assert m.up.weight.numel() == 0 and m.down.weight.numel() == 0
    assert m.head.weight is m.embed.weight and m.embed.weight.numel() == 50 * 16  # tied: still the embedding's
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m(x[:1]), want[:1], rtol=1e-5, atol=1e-4)  # one token: packed too, no plain left
    assert cpu_gemm.packed_bytes(m) == 4 * (32 * 16 + 16 * 32 + 50 * 16)


@pytest.mark.parametrize("mode,limit,kept", [("packed+plain", 0, True), ("auto", 2**30, True), ("auto", 0, False)])
def test_modes_that_keep_plain_copies(small_packable: None, monkeypatch: pytest.MonkeyPatch, mode: str, limit: int,
                                      kept: bool) -> None:
    """Without the C kernels "auto" keeps the plain copy beside the packed one while it fits the limit."""
    monkeypatch.setattr(cpu_gemm.native, "matmuls_available", lambda: False)
    monkeypatch.setattr(cpu_gemm, "KEEP_PLAIN_MAX_BYTES", limit)
    m = Tied()
    assert cpu_gemm.pack_linears(m, mode) == 3  # type: ignore[arg-type]
    assert (m.up.weight.numel() == 16 * 32) is kept


@pytest.mark.parametrize("mode", ["plain", "auto"])
def test_plain_and_auto_with_the_c_kernels_pack_nothing(small_packable: None, mode: str) -> None:
    """The "plain" mode never packs; "auto" does not where the C matmuls run on the plain weights."""
    assert native.matmuls_available()
    m = Tied()
    assert cpu_gemm.pack_linears(m, mode) == 0 and m.up.packed is None  # type: ignore[arg-type]
    assert m.up.weight.numel() == 16 * 32


def test_steps_up_to_gemm_size_take_the_plain_copy_when_kept(small_packable: None) -> None:
    """With both copies, up to GEMM_MAX_TOKENS tokens read the plain copy (the C kernels) and more on one thread go
    through oneDNN, bit for bit."""
    m = Tied()
    cpu_gemm.pack_linears(m, "packed+plain")
    few, some = torch.randn(GEMV_MAX_TOKENS, 16), torch.randn(GEMM_MAX_TOKENS, 16)
    many = torch.randn(GEMM_MAX_TOKENS + 1, 16)
    assert native.matmuls_available()
    assert torch.equal(m.up(few), native.gemv(few, m.up.weight))
    assert torch.equal(m.up(some), native.gemm(some, m.up.weight))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(m.up(many), cpu_gemm.packed_linear(many, m.up.packed, None))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads,plain", [(2, True), (1, False)])
def test_prefill_sized_steps_take_the_plain_copy_on_several_threads(small_packable: None, threads: int,
                                                                     plain: bool) -> None:
    """Above SPLIT_MAX_TOKENS, 2+ threads run PyTorch's own GEMM on the plain copy; one thread stays on oneDNN."""
    m = Tied()
    cpu_gemm.pack_linears(m, "packed+plain")
    x = torch.randn(SPLIT_MAX_TOKENS + 1, 16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = m.up(x)
    finally:
        torch.set_num_threads(before)
    want = F.linear(x, m.up.weight) if plain else cpu_gemm.packed_linear(x, m.up.packed, None)
    assert torch.equal(got, want)
