"""Token sampling on the last stage: greedy, temperature, top-k, top-p, min-p, per-request seeds."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token of one sequence (validated by the caller's schema)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax."""
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scale one row [V] and mask out tokens outside top-k / top-p / min-p with -inf."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    """Draws one token per row; seeded rows are reproducible whatever the batch or grid layout."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
        """Float32 logits [B, V], one params and one output index per row -> token ids."""
        out = logits.argmax(-1).tolist()
        for row, (p, step) in enumerate(zip(params, steps)):
            if p.greedy:
                continue
            probs = filter_logits(logits[row].float().cpu(), p).softmax(-1)
            gen = self.generator
            if p.seed is not None:
                # Seed from (request seed, output index) so a token never depends on batch neighbours.
                gen = torch.Generator().manual_seed((p.seed * 1_000_003 + step) % 2**63)  # any int seed, no overflow
            out[row] = int(torch.multinomial(probs, 1, generator=gen))
        return out
