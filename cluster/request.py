"""The request contract between a face and its replica: what to generate (`GenerationParams`, checked once
against the replica's limits) and what comes back (`ChoiceDelta`s per choice, `Result` for a whole one)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from actors.shard.sampler import SamplingParams
from cluster.structured import GrammarSpec

MAX_STOP_STRINGS = 4  # OpenAI's limit


class SamplingOptions(BaseModel):
    """How to sample, when to stop and how urgent: the request fields HTTP bodies and batch lines share."""

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
    min_tokens: int = Field(0, ge=0, description="vLLM extension: the end-of-sequence token and stop_token_ids "
                            "cannot be sampled before this many tokens (stop strings still end the text).")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100], "
                                                "added to its logit before sampling.")
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="vLLM extension: lower is admitted first and "
                          "preempted last under KV pressure; ties go in arrival order.")

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v: int, info: ValidationInfo) -> int:
        """Within max_tokens, when that is given."""
        most = info.data.get("max_tokens")
        if most is not None and v > most:
            raise ValueError(f"min_tokens ({v}) is above max_tokens ({most}); lower min_tokens or raise max_tokens")
        return v

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
    def _stops(self) -> SamplingOptions:
        """At most 4 non-empty stop strings, as OpenAI allows."""
        stops = self.stop_list()
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop: give at most {MAX_STOP_STRINGS} non-empty strings")
        return self

    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class Resume(BaseModel):
    """Where a choice stood on a replica that was lost: another replica continues it from there."""

    model_config = ConfigDict(extra="forbid")
    token_ids: list[int] = Field(description="Tokens the choice already generated (and its client received).")
    text_chars: int = Field(ge=0, description="Characters of their text the client already received (text that "
                            "may begin a stop string is held back, so this can be less than their whole text).")


class GenerationParams(SamplingOptions):
    """Everything a replica needs to run a request besides its prompt's token ids."""

    n: int = Field(1, ge=1, le=16, description="Choices to generate for the prompt.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return each token's logprob and this many top "
                                 "alternatives; None = no logprobs.")
    grammar: GrammarSpec | None = Field(None, description="Output constraint (structured outputs, forced tool "
                                        "calls); None = free text.")
    lora: str | None = Field(None, description="LoRA adapter to generate with (the request's `model` when it "
                             "names one); None = the base model.")
    lora_slot: tuple[int, int] | None = Field(None, description="(slot, prefix-cache root) the replica pinned for "
                                              "`lora`; set by the replica, never by clients.")
    resume: Resume | None = Field(None, description="Continue one choice (n=1; its seed already offset by its "
                                  "index) from where a lost replica left it; set by the ingress, never by clients.")

    @model_validator(mode="after")
    def _one_choice_resumes(self) -> GenerationParams:
        if self.resume is not None and self.n != 1:
            raise ValueError(f"resume continues one choice; n must be 1, got n={self.n}")
        return self

    def sampling(self, index: int = 0) -> SamplingParams:
        """The sampler's view of choice `index` (choices of one seeded request get consecutive seeds)."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.min_p, seed, self.repetition_penalty,
                              self.presence_penalty, self.frequency_penalty, self.logprobs,
                              tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
                              min_tokens=self.min_tokens)

    def check(self, prompt_ids: list[int], limits: Limits) -> int:
        """The one check against what a replica can serve; returns the tokens to generate (RequestError if never)."""
        if limits.vocab_size is not None:
            if prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= limits.vocab_size):
                raise RequestError(f"prompt token ids must lie in [0, {limits.vocab_size})", "prompt")
            if any(int(token) >= limits.vocab_size for token in self.logit_bias or {}):
                raise RequestError(f"logit_bias token ids must lie in [0, {limits.vocab_size})", "logit_bias")
        budget = token_budget(len(prompt_ids), self.max_tokens, min(limits.max_model_len, limits.kv_tokens))
        if self.resume is not None:
            done = self.resume.token_ids
            if limits.vocab_size is not None and any(not 0 <= t < limits.vocab_size for t in done):
                raise RequestError(f"resume token ids must lie in [0, {limits.vocab_size})", "resume")
            if len(done) >= budget:
                raise RequestError(f"resume has {len(done)} tokens, the whole budget of {budget}: nothing is left "
                                   "to generate", "resume")
        return budget


@dataclass(frozen=True)
class Limits:
    """What one replica can serve: its context length, KV-cache capacity and vocabulary (None: not checked)."""

    max_model_len: int
    kv_tokens: int
    vocab_size: int | None = None


@dataclass
class TokenLogprob:
    """One generated token's logprob and its top alternatives, decoded to text by the replica."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class ChoiceDelta:
    """What one choice produced since its last delta: the replica's answer, one or more per wake-up."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # set on a choice's last delta: stop, length, abort or error
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked
    cached_tokens: int | None = None  # on a choice's first delta: prompt tokens the prefix cache served
    error: str | None = None  # with finish_reason "error": what failed


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
    """A request that can never be served as sent; `param` names the field to change, `status` the HTTP code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


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

