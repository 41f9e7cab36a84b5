"""Token sampling on the last stage: penalties, greedy, temperature, top-k/p, min-p, seeds, logprobs."""
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
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    logprobs: int | None = None  # also return the sampled token's log-probability and this many top ones
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) added to the logits before sampling

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the sequence's previous tokens (penalties)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

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


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [G, ceil(V/32)] (bit j of word w = token 32w+j allowed) -> bool [G, V]."""
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = (bits.unsqueeze(-1) >> shifts) & 1  # [G, W, 32]
    return allowed.view(bits.shape[0], -1)[:, :vocab_size].bool()


Logprobs = tuple[float, list[tuple[int, float]]]  # (sampled token's logprob, [(token, logprob)] top-n)


def apply_penalties(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Repetition penalty over prompt + output, presence/frequency penalties over the output, on one row [V]."""
    logits = logits.clone()
    if p.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if output and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits.numel()).float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


class Sampler:
    """Draws one token per row; seeded rows are reproducible whatever the batch or grid layout."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
        """Float32 logits [B, V], one params and one output index per row -> token ids."""
        return self.sample(logits, params, steps, [None] * len(params))[0]

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], steps: list[int],
               histories: list[tuple[list[int], list[int]] | None],
               allowed: tuple[list[int], torch.Tensor] | None = None) -> tuple[list[int], list[Logprobs | None]]:
        """Token ids and (where asked) logprobs; `histories` holds (prompt, output) for rows with penalties,
        `allowed` (rows, bool [G, V]) the grammar masks of structured-output rows."""
        raw = logits
        if any(h is not None for h in histories) or any(p.logit_bias for p in params) or allowed is not None:
            logits = logits.clone()
        for row, (p, h) in enumerate(zip(params, histories)):
            if h is not None:
                logits[row] = apply_penalties(logits[row], p, h[0], h[1])
            if p.logit_bias:
                ids, bias = zip(*p.logit_bias)
                logits[row, list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
        if allowed is not None:
            rows, mask = allowed
            logits[rows] = logits[rows].masked_fill(~mask.to(logits.device), float("-inf"))
        out = self._draw(logits, params, steps)
        return out, [self._logprobs(raw[row], tok, p.logprobs) if p.logprobs is not None else None
                     for row, (p, tok) in enumerate(zip(params, out))]

    @staticmethod
    def _logprobs(row: torch.Tensor, token: int, top: int) -> Logprobs:
        """The model's log-probability of `token` and of its `top` likeliest tokens."""
        lp = torch.log_softmax(row.float(), -1)
        vals, ids = torch.topk(lp, top) if top > 0 else (lp[:0], lp[:0].long())
        return float(lp[token]), list(zip(ids.tolist(), vals.tolist()))

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
        """Argmax for greedy rows, a (seeded where asked) draw from the filtered distribution otherwise."""
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
