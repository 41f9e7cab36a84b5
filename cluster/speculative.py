"""n-gram (prompt-lookup) speculative decoding: draft tokens copied from where a sequence already said what it
is saying now; the grid verifies them in one step (`actors.shard.sampler.Sampler.verify`), so output is exactly
what decoding token by token would give, only with fewer steps when drafts are accepted."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpeculativeConfig(BaseModel):
    """vLLM's `speculative_config` for its n-gram method (no draft model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field("ngram", pattern="^ngram$", description="Only 'ngram' (prompt lookup) is offered.")
    num_speculative_tokens: int = Field(ge=1, le=16, description="Most draft tokens verified per step.")
    prompt_lookup_max: int = Field(4, ge=1, le=64, description="Longest n-gram looked up in the sequence.")
    prompt_lookup_min: int = Field(1, ge=1, le=64, description="Shortest n-gram looked up in the sequence.")

    @model_validator(mode="after")
    def _ordered(self) -> SpeculativeConfig:
        """The shortest n-gram cannot exceed the longest."""
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min={self.prompt_lookup_min} exceeds "
                             f"prompt_lookup_max={self.prompt_lookup_max}; lower it or raise prompt_lookup_max")
        return self


def propose(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the sequence's last n tokens (the longest
    n from `n_max` down to `n_min` that occurs), or none."""
    if k < 1 or len(tokens) <= n_min:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, len(seq) - 1), n_min - 1, -1):
        windows = sliding_window_view(seq[:-1], n)  # [L - n, n]: every earlier n-gram (the suffix itself excluded)
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # what followed the latest match
            return [int(t) for t in seq[start:start + k]]
    return []
