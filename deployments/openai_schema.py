"""Request and response bodies of the OpenAI-compatible API (the subset gridserve implements)."""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.shard.sampler import SamplingParams


class StreamOptions(BaseModel):
    """`stream_options` of a streaming request."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with token usage (empty choices) before [DONE].")


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Served model name (see GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; default fills max_model_len.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="vLLM extension: sample among the k likeliest tokens; 0 = off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM extension.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Streaming only: include_usage.")
    n: int = Field(1, ge=1, le=16, description="Completions to generate for the prompt.")
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="vLLM extension; 1 = off.")
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64, description="vLLM extension.")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS.")

    @model_validator(mode="after")
    def _stops(self) -> "SamplingFields":
        """At most 4 non-empty stop strings, as OpenAI allows."""
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: give at most 4 non-empty strings")
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
                              self.presence_penalty, self.frequency_penalty, self.top_logprobs_asked())


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(description="Text, or a list of token ids.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many top logprobs per token.")
    echo: bool = Field(False, le=False, description="Not supported (must be false).")

    def top_logprobs_asked(self) -> int | None:
        """Legacy completions: `logprobs` is the top-n count."""
        return self.logprobs


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = Field(False, description="Return the sampled tokens' logprobs.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives per token (needs logprobs).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")

    @model_validator(mode="after")
    def _max_completion_tokens(self) -> "ChatRequest":
        """Accept the newer `max_completion_tokens` as `max_tokens`."""
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def top_logprobs_asked(self) -> int | None:
        """Chat: `logprobs: true` turns them on, `top_logprobs` sets the count."""
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix seconds."""
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
