"""Request and response bodies of the OpenAI-compatible API (the subset gridserve implements).

Every check a body can fail without the model lives here, in the models' validators: a `RequestError` raised in
one names its field (`deployments.http.parse_body` answers it as a 4xx). Checks that need the replica (prompt
length, vocabulary) are `GenerationParams.check`, made once by the replica.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from cluster.request import GenerationParams, RequestError, SamplingOptions
from cluster.structured import GrammarSpec
from deployments.openai_extras import ChatMessage, ClientFields, NamedToolChoice, Tool
from deployments.structured import grammar_of
from deployments.tools import ToolOutput, tool_grammar, tool_mode


class SamplingFields(SamplingOptions, ClientFields):
    """Fields shared by completions and chat completions: the sampling options plus the HTTP-only ones."""

    model: str = Field(description="Served model name (see GET /v1/models).")
    stream: bool = False
    n: int = Field(1, ge=1, le=16, description="Completions to generate for the prompt.")
    user: str | None = None
    _grammar: GrammarSpec | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _served_model_and_grammar(self, info: ValidationInfo) -> SamplingFields:
        """The model is the one served (when the caller says which) and at most one enforceable constraint."""
        check_served(self.model, info)
        self._grammar = grammar_of(self, self.tool_constraint())
        return self

    def tool_constraint(self) -> tuple[str, GrammarSpec] | None:
        """The grammar a forced tool call generates under (chat only)."""
        return None

    def logprob_count(self) -> int | None:
        """How many top logprobs per token the request wants (None = no logprobs)."""
        return None

    def params(self) -> GenerationParams:
        """What the replica needs: the sampling options, n, logprobs and the output constraint."""
        options = self.model_dump(include=set(SamplingOptions.model_fields))
        return GenerationParams(**options, n=self.n, logprobs=self.logprob_count(), grammar=self._grammar)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(description="Text, or a list of token ids.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many top logprobs per token.")
    echo: bool = Field(False, le=False, description="Not supported (must be false).")

    def logprob_count(self) -> int | None:
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
    def _max_completion_tokens(self) -> ChatRequest:
        """Accept the newer `max_completion_tokens` as `max_tokens`."""
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def tool_mode(self) -> tuple[str, str | None]:
        """(mode, forced function name): 'none', 'auto', 'required' or 'named' (checked against `tools`)."""
        return tool_mode(self.tools, self.tool_choice)

    def tool_parsers(self) -> Callable[[], ToolOutput] | None:
        """A maker of one tool-call parser per choice (None when tools are off)."""
        mode, name = self.tool_mode()
        return None if mode == "none" else (lambda: ToolOutput(mode, name))

    def tool_constraint(self) -> tuple[str, GrammarSpec] | None:
        """The grammar of a `required` or named tool choice."""
        mode, name = self.tool_mode()
        return tool_grammar(self.tools, mode, name, self.parallel_tool_calls)

    def logprob_count(self) -> int | None:
        """Chat: `logprobs: true` turns them on, `top_logprobs` sets the count."""
        return (self.top_logprobs or 0) if self.logprobs else None


def check_served(model: str, info: ValidationInfo) -> None:
    """A 404 naming `model` unless it is the one the server serves (given as validation context, if at all)."""
    served = (info.context or {}).get("served_model")
    if served is not None and model != served:
        raise RequestError(f"model {model!r} does not exist; this server serves {served!r}", "model", 404,
                           "model_not_found")


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix seconds."""
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
