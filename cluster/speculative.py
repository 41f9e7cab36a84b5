"""Speculative decoding's settings (vLLM's `speculative_config`) and its n-gram proposer.

n-gram (prompt lookup): drafts are copied from where a sequence already said what it is saying now. draft_model:
a smaller model with the target's tokenizer proposes them greedily (`cluster.draft`). Either way the grid verifies
them in one step (`actors.shard.sampler.Sampler.verify`), so output is exactly what decoding token by token would
give, only with fewer target steps when drafts are accepted."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from actors.shard.spec import ModelSpec
    from cluster.sequence import Sequence

NGRAM_FIELDS = ("prompt_lookup_max", "prompt_lookup_min")


class SpeculativeConfig(BaseModel):
    """vLLM's `speculative_config`: its n-gram method, or a draft model (method inferred from `model`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ngram", "draft_model"] = Field(
        "ngram", description="'ngram' (prompt lookup) or 'draft_model' (a smaller model proposes); default: "
        "'draft_model' when `model` is given, else 'ngram'.")
    model: str | None = Field(None, description="draft_model: local Hugging Face folder (or .gguf) of a smaller "
                              "model with the target's tokenizer.")
    num_speculative_tokens: int = Field(ge=1, le=16, description="Most draft tokens verified per step.")
    draft_tensor_parallel_size: int = Field(1, description="Workers of the draft model: only 1 (it runs whole, "
                                            "beside the replica's engine).")
    prompt_lookup_max: int = Field(4, ge=1, le=64, description="ngram: longest n-gram looked up in the sequence.")
    prompt_lookup_min: int = Field(1, ge=1, le=64, description="ngram: shortest n-gram looked up in the sequence.")

    @model_validator(mode="before")
    @classmethod
    def _infer_method(cls, data: Any) -> Any:
        """As vLLM: a `model` without a `method` means a draft model."""
        if isinstance(data, dict) and data.get("model") is not None and data.get("method") is None:
            return {**data, "method": "draft_model"}
        return data

    @field_validator("model")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Resolve the folder now, as the target's `model` is."""
        if value is None:
            return None
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeConfig:
        """Each method's own fields, and the draft layouts this build runs."""
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError(f"speculative_config.model={self.model!r} is set but method is 'ngram'; drop "
                                 "`model` or set method: draft_model")
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise ValueError(f"speculative_config.prompt_lookup_min={self.prompt_lookup_min} exceeds "
                                 f"prompt_lookup_max={self.prompt_lookup_max}; lower it or raise prompt_lookup_max")
            return self
        if self.model is None:
            raise ValueError("speculative_config.method='draft_model' needs `model`: a local folder of a smaller "
                             "model with the target's tokenizer")
        ngram_only = sorted(set(NGRAM_FIELDS) & self.model_fields_set)
        if ngram_only:
            raise ValueError(f"speculative_config: {', '.join(ngram_only)} apply to method 'ngram' only; drop "
                             "them for a draft model")
        if self.draft_tensor_parallel_size != 1:
            raise ValueError(f"speculative_config.draft_tensor_parallel_size={self.draft_tensor_parallel_size}: "
                             "the draft model runs as one worker (no tensor or pipeline parallelism); set it to 1 "
                             "or pick a draft small enough for one device")
        return self


def draft_problems(spec: SpeculativeConfig | None, target: ModelSpec, max_model_len: int) -> list[str]:
    """What keeps a draft model from serving beside `target`: an unreadable folder, another vocabulary (the
    draft must share the target's tokenizer), a shorter context than `max_model_len`."""
    if spec is None or spec.method != "draft_model" or spec.model is None:
        return []
    from actors.shard.checkpoint import model_spec

    try:
        draft = model_spec(spec.model)
    except ValueError as exc:
        return [f"speculative_config.model: {exc}"]
    problems = []
    if draft.vocab_size != target.vocab_size:
        problems.append(f"speculative_config.model={spec.model!r} has vocab_size={draft.vocab_size} but the target "
                        f"model has vocab_size={target.vocab_size}; a draft must use the target's tokenizer: pick a "
                        "smaller model of the same family (or a truncated copy of the target)")
    if draft.max_position_embeddings < max_model_len:
        problems.append(f"speculative_config.model={spec.model!r} has a context of {draft.max_position_embeddings} "
                        f"tokens, shorter than max_model_len={max_model_len}; lower max_model_len or use a draft "
                        "with a longer context")
    return problems


class Drafter(Protocol):
    """What proposes drafts for a batch of decoding sequences (a draft model: `cluster.draft.DraftModel`)."""

    def propose(self, seqs: list[Sequence], rooms: list[int], live: list[Sequence]) -> list[list[int]]:
        """Up to `rooms[i]` draft tokens for each of `seqs`; state kept for sequences not in `live` is dropped."""
        ...


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
