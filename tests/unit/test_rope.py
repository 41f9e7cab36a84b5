"""Rotary embedding: the three-pass form equals Hugging Face's rotate_half form, on the strided views the model uses."""
import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from actors.shard.rope import Rotary, apply_rotary


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_apply_rotary_matches_hf_rotate_half(tokens: int) -> None:
    """q and k rows sliced out of a fused QKV output (not contiguous), Llama 3 scaled frequencies."""
    g = torch.Generator().manual_seed(tokens)
    heads, kv_heads, d = 6, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)
    qk = qkv[:, :(heads + kv_heads) * d].view(tokens, heads + kv_heads, d)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cos, sin = Rotary(d, 500000.0, scaling, 512, torch.float32, torch.device("cpu")).tables(
        torch.randint(0, 512, (tokens,), generator=g))
    want = qk * cos + rotate_half(qk) * sin
    torch.testing.assert_close(apply_rotary(qk, cos, sin), want, rtol=0, atol=1e-6)
