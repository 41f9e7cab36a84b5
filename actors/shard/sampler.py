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
    min_tokens: int = 0  # `stop_ids` cannot be sampled at output indices below this
    stop_ids: tuple[int, ...] = ()  # the tokens that end the sequence (EOS, stop_token_ids), set by the engine

    def holds_stops(self, step: int) -> bool:
        """Whether the token at output index `step` must not be a stop token (min_tokens not reached)."""
        return step < self.min_tokens and bool(self.stop_ids)

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
        held = [p.holds_stops(step) for p, step in zip(params, steps)]
        if (any(h is not None for h in histories) or any(p.logit_bias for p in params) or allowed is not None
                or any(held)):
            logits = logits.clone()
        for row, (p, h) in enumerate(zip(params, histories)):
            if h is not None:
                logits[row] = apply_penalties(logits[row], p, h[0], h[1])
            if p.logit_bias:
                ids, bias = zip(*p.logit_bias)
                logits[row, list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
            if held[row]:
                logits[row, list(p.stop_ids)] = float("-inf")
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
        """Argmax for greedy rows; the other rows' filtered distributions sampled together, each with its own
        uniform (seeded where asked)."""
        rows = [row for row, p in enumerate(params) if not p.greedy]
        out = logits.argmax(-1).tolist() if len(rows) < len(params) else [0] * len(params)
        if not rows:
            return out
        picked = (logits if len(rows) == len(params) else logits[rows]).float().cpu()  # [R, V]
        temps = torch.tensor([params[r].temperature for r in rows], dtype=picked.dtype)
        scaled = picked / temps[:, None]
        for k, row in enumerate(rows):
            p = params[row]
            if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
                scaled[k] = filter_logits(picked[k], p)
        probs = scaled.softmax(-1)
        tokens = inverse_cdf(probs, self._uniforms([params[r] for r in rows], [steps[r] for r in rows]))
        for k, row in enumerate(rows):
            out[row] = int(tokens[k])
        return out

    def verify(self, logits: torch.Tensor, drafts: list[int], p: SamplingParams, step: int) -> tuple[list[int], int]:
        """Speculative verification of one row: logits [d + 1, V] at the positions that read the last known token
        and each of the d drafts -> (the drafts accepted, the token after them).

        Greedy: drafts are kept while each equals the argmax. Sampled: draft j is kept with probability p_j(draft),
        else the token is drawn from p_j without the draft, renormalized (rejection sampling with a deterministic
        draft); after all d, one more from p_d. Every emitted token is then distributed exactly as when drawn one
        step at a time. Uniforms come from (seed, output index) as in `sample`, so seeded rows stay reproducible.
        """
        held = [j for j in range(len(drafts) + 1) if p.holds_stops(step + j)]
        if held:  # min_tokens not reached at these positions: no stop token there
            logits = logits.clone()
            logits[torch.tensor(held)[:, None], torch.tensor(p.stop_ids)[None, :]] = float("-inf")
        if p.greedy:
            targets = logits.argmax(-1).tolist()
            n = 0
            while n < len(drafts) and drafts[n] == targets[n]:
                n += 1
            return drafts[:n], int(targets[n])
        probs = torch.stack([filter_logits(row.float().cpu(), p) for row in logits]).softmax(-1)  # [d + 1, V]
        for j, draft in enumerate(drafts):
            accept, redraw = self._stream(p, step + j, 2)
            if accept < float(probs[j, draft]):
                continue
            rest = probs[j].clone()
            rest[draft] = 0.0
            return drafts[:j], int(inverse_cdf(rest[None], torch.tensor([redraw], dtype=torch.float64))[0])
        last = self._stream(p, step + len(drafts), 1)
        return drafts, int(inverse_cdf(probs[-1:], torch.tensor(last, dtype=torch.float64))[0])

    def _uniforms(self, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
        """One uniform in [0, 1) per row, each from `_stream` (unseeded rows drawn together)."""
        u = torch.rand(len(params), dtype=torch.float64, generator=self.generator).tolist()
        for k, (p, step) in enumerate(zip(params, steps)):
            if p.seed is not None:
                u[k] = self._stream(p, step, 1)[0]
        return torch.tensor(u, dtype=torch.float64)

    def _stream(self, p: SamplingParams, step: int, n: int) -> list[float]:
        """`n` uniforms in [0, 1) for output index `step`: from (request seed, step) for a seeded row, so a token
        never depends on batch neighbours, else from this sampler's generator."""
        gen = self.generator
        if p.seed is not None:
            gen = torch.Generator().manual_seed((p.seed * 1_000_003 + step) % 2**63)  # any int seed, no overflow
        return torch.rand(n, dtype=torch.float64, generator=gen).tolist()


INVERSE_CDF_BLOCK = 256  # tokens per block of the two-level search: one cumulative sum over blocks, one inside one


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [R] drawn from rows of probabilities [R, V] by the uniforms u [R], exactly (inverse transform).

    A cumulative sum over the whole vocabulary is a serial scan; per-block sums (vectorised), a scan over the few
    blocks, and one over the chosen block cost about one more pass over the row (torch.multinomial: ~10x more).
    """
    r, v = probs.shape
    w = INVERSE_CDF_BLOCK
    blocks = torch.nn.functional.pad(probs, (0, -v % w)).view(r, -1, w)  # [R, nb, w], zero mass past the vocab
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [R, nb]
    x = (u * cdf[:, -1])[:, None]  # [R, 1]: the mass to walk past
    b = torch.searchsorted(cdf, x, right=True).clamp_(max=cdf.shape[1] - 1)  # [R, 1], first block whose cdf > x
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), 0.0)  # [R, 1]
    inner = blocks[torch.arange(r), b[:, 0]]  # [R, w]
    j = torch.searchsorted(inner.double().cumsum(-1), x - before, right=True).clamp_(max=w - 1)  # [R, 1]
    tokens = (b * w + j)[:, 0].clamp_(max=v - 1)
    # Rounding between the two sums can land on a zero-probability token at a block's end: redraw those exactly.
    bad = probs.gather(1, tokens[:, None])[:, 0] <= 0
    for k in bad.nonzero()[:, 0].tolist():
        row = probs[k].double().cumsum(0)
        tokens[k] = torch.searchsorted(row, u[k] * row[-1], right=True).clamp_(max=v - 1)
        while probs[k, tokens[k]] <= 0:  # u * total rounded up to the total: step back to the last real token
            tokens[k] -= 1
    return tokens
