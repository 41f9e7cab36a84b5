"""Rotary position embeddings, including Llama 3 frequency scaling."""
from __future__ import annotations

import math
from typing import Any

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim / 2] in float32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling.get("rope_type") == "freq_factors":  # GGUF `rope_freqs`: each frequency divided by its factor
        return inv / torch.tensor(scaling["factors"], dtype=torch.float32)
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    blend = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - blend) * scaled / factor + blend * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, smoothed, scaled)


class Rotary:
    """Cos/sin tables for every position up to `max_len`, looked up per token."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        inv = inv_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # [max_len, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_len, d]
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin [T, 1, d] for token positions [T] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, d] by position: x * cos + rotate_half(x) * sin, for tables whose halves are equal (Rotary's).

    Three passes in place of rotate_half's negate, concatenate, two multiplies and add: fewer passes over the
    activations, most of all in long prefills (values within an ulp of the five-op form).
    """
    half = x.shape[-1] // 2
    out = x * cos  # [T, heads, d]
    s = sin[..., :half]
    out[..., :half].addcmul_(x[..., half:], s, value=-1)  # x1 cos - x2 sin
    out[..., half:].addcmul_(x[..., :half], s)  # x2 cos + x1 sin
    return out
