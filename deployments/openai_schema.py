"""Request and response bodies of the OpenAI-compatible API (the subset gridserve implements)."""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.request import GenerationParams
from deployments.openai_extras import ChatMessage, ClientFields, NamedToolChoice, Tool


class SamplingFields(GenerationParams, ClientFields):
    """Fields shared by completions and chat completions: the one request model plus the HTTP-only ones."""

    model: str = Field(description="Served model name (see GET /v1/models).")
    stream: bool = False
    n: int = Field(1, ge=1, le=16, description="Completions to generate for the prompt.")
    user: str | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(description="Text, or a list of token ids.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many top logprobs per token.")
    echo: bool = Field(False, le=False, description="Not supported (must be false).")

    def top_logprobs_asked(self) -> int | None:
        """Legacy completions: `logprobs` is the top-n count."""
        return self.logprobs


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = Field(False, description="Return the sampled tokens' logprobs.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives per token (needs logprobs).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")
    tools: list[Tool] | None = Field(None, max_length=128, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none | auto (default with tools) | required | a named function.")
    parallel_tool_calls: bool | None = Field(None, description="With `required`: allow more than one call.")

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
