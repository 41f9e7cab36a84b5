"""Request and response bodies of the OpenAI-compatible API (the subset gridserve implements)."""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.shard.sampler import SamplingParams


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
    n: int = Field(1, ge=1, le=1, description="Only n=1 is served for now.")
    user: str | None = None
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

    def sampling(self) -> SamplingParams:
        """The sampler's view of the request."""
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.min_p, self.seed)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(description="Text, or a list of token ids.")


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)


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
