"""Request fields that current OpenAI clients send beyond plain sampling: messages with parts and tool calls,
tools, structured outputs (OpenAI's and vLLM's spellings), stream options and bookkeeping fields."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.request import RequestError


class ContentPart(BaseModel):
    """One part of a message's content; only text parts can be read (others are refused by name)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="'text' is supported; 'image_url', 'input_audio', 'file' are refused with 400.")
    text: str | None = None


class FunctionCall(BaseModel):
    """A function call an assistant turn made: name and JSON-encoded arguments."""

    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str = Field(description="The arguments as a JSON string, as OpenAI sends them.")


class ToolCall(BaseModel):
    """One tool call of an assistant turn in the history."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One chat turn: text or text parts; assistant turns may carry tool calls, tool turns answer one."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="Assistant turns: the calls it made.")
    tool_call_id: str | None = Field(None, description="Tool turns: which call this answers.")
    refusal: str | None = Field(None, description="Assistant turns as OpenAI returns them (not rendered).")

    @model_validator(mode="after")
    def _readable(self) -> ChatMessage:
        """Text parts only (this model reads text); a tool turn says which call it answers."""
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.type != "text" or part.text is None:
                raise RequestError(f"content[{j}] is a {part.type!r} part; this model reads text only, send "
                                   "'text' parts", f"content.{j}")
        if self.role == "tool" and self.tool_call_id is None:
            raise RequestError("a message with role 'tool' needs the tool_call_id it answers", "tool_call_id")
        return self

    def text(self) -> str:
        """The message's text: a string as is, text parts joined by newlines."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text or "" for part in self.content)


class FunctionDef(BaseModel):
    """A function the model may call."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments object.")
    strict: bool | None = Field(None, description="Accepted; arguments always follow the schema when forced.")


class Tool(BaseModel):
    """One entry of `tools`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    """The function a named tool_choice forces."""

    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: a named JSON schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema itself.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: free text, any JSON object, or JSON under a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` request field: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="A Lark grammar (llguidance's dialect).")
    json_object: bool | None = None


class StreamOptions(BaseModel):
    """`stream_options`."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with token usage and no choices.")
    continuous_usage_stats: bool = Field(False, description="vLLM extension; accepted, usage comes once at the end.")


class ClientFields(BaseModel):
    """Fields of both completions and chat: structured outputs, stream options, bias and bookkeeping."""

    model_config = ConfigDict(extra="forbid")

    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema.")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM extension: output follows this schema.")
    guided_regex: str | None = Field(None, description="vLLM extension: output matches this regex.")
    guided_choice: list[str] | None = Field(None, min_length=1, description="vLLM extension: one of these strings.")
    guided_grammar: str | None = Field(None, description="vLLM extension: a Lark grammar (llguidance dialect).")
    guided_decoding_backend: str | None = Field(None, description="vLLM extension; accepted, llguidance is used.")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM extension: one constraint.")
    stream_options: StreamOptions | None = None
    metadata: dict[str, str] | None = Field(None, description="Stored-completion tags; accepted, not stored.")
    store: bool | None = Field(None, description="Accepted; gridserve stores nothing.")
    service_tier: str | None = Field(None, description="Accepted; one tier here.")
    prompt_cache_key: str | None = Field(None, description="Accepted; the prefix cache works by content.")
    safety_identifier: str | None = Field(None, description="Accepted; not used.")
    modalities: list[Literal["text"]] | None = Field(None, description="Only ['text'].")
