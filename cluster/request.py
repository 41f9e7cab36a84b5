"""The one request model: sampling and limits of a generation, shared by HTTP bodies and batch lines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.shard.sampler import SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit


class GenerationParams(BaseModel):
    """How to generate: sampling, stop rules and the token limit (the prompt is the caller's)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; default fills max_model_len.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="vLLM extension: sample among the k likeliest tokens; 0 = off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM extension: drop tokens below min_p x the top "
                         "probability.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Per-request seed: the same seed gives the "
                             "same tokens whatever the batch.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings; the text ends before them.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted once from tokens already "
                                    "generated.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted per occurrence in the "
                                     "generated tokens.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="vLLM extension; 1 = off.")
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64, description="vLLM extension: token ids "
                                      "that end the generation.")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-sequence token.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100], "
                                                "added to its logit before sampling.")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids, values lie in [-100, 100], as OpenAI requires."""
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"key {key!r} is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias {bias} of token {key} is outside [-100, 100]")
        return v

    @model_validator(mode="after")
    def _stops(self) -> "GenerationParams":
        """At most 4 non-empty stop strings, as OpenAI allows."""
        stops = self.stop_list()
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop: give at most {MAX_STOP_STRINGS} non-empty strings")
        return self

    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_logprobs_asked(self) -> int | None:
        """How many top logprobs per token the request wants (None = no logprobs)."""
        return None

    def sampling(self, index: int = 0) -> SamplingParams:
        """The sampler's view of choice `index` (choices of one seeded request get consecutive seeds)."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.min_p, seed, self.repetition_penalty,
                              self.presence_penalty, self.frequency_penalty, self.top_logprobs_asked(),
                              tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))


@dataclass
class Result:
    """A finished (or failed) generation."""

    request_id: Any
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    error: str | None = None


class RequestError(ValueError):
    """A request that can never be served as sent; `param` names the field to change."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def token_budget(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """The one check of prompt length against max_model_len; returns the tokens to generate (default: all room)."""
    if prompt_len < 1:
        raise RequestError("prompt is empty; give at least one token", "prompt")
    room = max_model_len - prompt_len
    if room < 1:
        raise RequestError(f"prompt has {prompt_len} tokens; max_model_len is {max_model_len}, which leaves no "
                           "room to generate; shorten the prompt", "prompt")
    if max_tokens is not None and max_tokens > room:
        raise RequestError(f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                           f"max_model_len={max_model_len}; lower max_tokens to at most {room}", "max_tokens")
    return room if max_tokens is None else max_tokens


def check_prompt(prompt_ids: list[int], vocab_size: int, max_tokens: int | None, max_model_len: int) -> int:
    """Token ids in the vocabulary and within max_model_len; returns the tokens to generate."""
    if prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size):
        raise RequestError(f"prompt token ids must lie in [0, {vocab_size})", "prompt")
    return token_budget(len(prompt_ids), max_tokens, max_model_len)


def check_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> None:
    """Every biased token id lies in the vocabulary."""
    if any(int(token) >= vocab_size for token in bias or {}):
        raise RequestError(f"logit_bias token ids must lie in [0, {vocab_size})", "logit_bias")
