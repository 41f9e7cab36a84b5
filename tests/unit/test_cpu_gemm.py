"""oneDNN packed CPU weights: same products as F.linear, plain copies freed, tied weights kept."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actors.shard import cpu_gemm
from actors.shard.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from actors.shard.tp import TPGroup

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("tokens", [1, 3, 32, 300])
def test_packed_linear_matches_f_linear(tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    x, w, b = torch.randn(tokens, 96, generator=g), torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    packed = cpu_gemm.pack(w)
    assert packed is not None
    torch.testing.assert_close(cpu_gemm.packed_linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_pack_is_none_off_fp32() -> None:
    assert cpu_gemm.pack(torch.randn(8, 8, dtype=torch.float64)) is None


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


def test_pack_linears_frees_plain_weights_but_keeps_shared_ones() -> None:
    m = Tied()
    x = torch.randn(5, 16)
    want = m.head(m.down(m.up(x)))
    assert cpu_gemm.pack_linears(m) == 3  # up, down, head (the embedding has no packed slot)
    assert m.up.weight.numel() == 0 and m.down.weight.numel() == 0
    assert m.head.weight is m.embed.weight and m.embed.weight.numel() == 50 * 16  # tied: still the embedding's
    torch.testing.assert_close(m.head(m.down(m.up(x))), want, rtol=1e-5, atol=1e-4)
    assert cpu_gemm.packed_bytes(m) == 4 * (32 * 16 + 16 * 32 + 50 * 16)
