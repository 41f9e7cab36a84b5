"""The C RMSNorm (native.rms_norm) gives the reference's values at decode and prefill sizes, and RMSNorm uses it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actors.shard import layers, native
from actors.shard.layers import RMSNorm


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm in float32: normalise, then scale by the weight."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(1, 768), (3, 5), (200, 576), (2, 17, 64), (1, 7)])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_rms_norm_matches_the_reference(shape: tuple[int, ...], num_threads: int) -> None:
    """Rows over and under the threaded size, widths with and without a tail past eight lanes, 3-D input."""
    assert native.available(), "the C kernels must build on this machine (gcc)"
    g = torch.Generator().manual_seed(sum(shape))
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        got = native.rms_norm(x, w, 1e-5)
    finally:
        torch.set_num_threads(before)
    assert got.shape == x.shape
    torch.testing.assert_close(got, reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)


def test_rms_norm_layer_takes_the_c_kernel_on_cpu_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 on CPU goes through native.rms_norm; bfloat16 keeps the float32-upcast torch form."""
    calls: list[torch.dtype] = []
    real = native.rms_norm
    monkeypatch.setattr(layers.native, "rms_norm", lambda x, *a: calls.append(x.dtype) or real(x, *a))
    norm = RMSNorm(16, 1e-6, torch.float32)
    x = torch.randn(4, 16)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, 1e-6))
    RMSNorm(16, 1e-6, torch.bfloat16)(x.bfloat16())
    assert calls == [torch.float32]
