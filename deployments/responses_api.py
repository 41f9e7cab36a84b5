"""POST /v1/responses bodies: OpenAI's Responses API request, checked up front (a `RequestError` names the field)
and turned into what the chat path runs: chat turns, function tools and one `GenerationParams`."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from cluster.request import GenerationParams, RequestError
from cluster.structured import GrammarSpec
from deployments.openai_extras import ChatMessage, FunctionDef, NamedFunction, NamedToolChoice, Tool
from deployments.openai_schema import check_served
from deployments.responses_items import ITEM_TYPES, TEXT_PARTS, InputItem, chat_turns, item_type, unreadable_part
from deployments.structured import checked
from deployments.tools import ToolOutput, tool_grammar, tool_mode

# OpenAI fields gridserve does not implement: accepted only with a value that turns them off, else a 400 saying why.
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "background": ((None, False), "responses run in the foreground; omit it or send false"),
    "conversation": ((None,), "conversation objects are not kept; chain turns with previous_response_id"),
    "prompt": ((None,), "stored prompt templates are OpenAI's; send the text as input"),
    "include": ((None, []), "no extra output data (logprobs, sources) is returned; omit it"),
    "top_logprobs": ((None, 0), "logprobs are not returned by this endpoint; use /v1/chat/completions"),
    "truncation": ((None, "disabled"), "inputs are never truncated; an input over max_model_len is a 400"),
    "context_management": ((None, []), "context is never compacted"),
    "reasoning": ((None,), "the served model does not reason in a separate channel"),
}


class FunctionTool(BaseModel):
    """A function the model may call (the Responses API's flat form)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments object.")
    strict: bool | None = Field(None, description="Accepted; arguments follow the schema whenever a call is forced.")

    def chat(self) -> Tool:
        """The chat API's form of this tool."""
        return Tool(function=FunctionDef(name=self.name, description=self.description, parameters=self.parameters,
                                         strict=self.strict))


class FunctionChoice(BaseModel):
    """`tool_choice: {"type": "function", "name": ...}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """`text.format`: free text, any JSON object, or JSON under a named schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def grammar(self) -> GrammarSpec | None:
        """The constraint this format puts on the output text (checked: a 400 if it cannot be enforced)."""
        if self.type == "json_object":
            return GrammarSpec("json_object", "")
        if self.type == "text":
            return None
        if self.json_schema is None or self.name is None:
            raise RequestError("text.format of type json_schema needs `name` and `schema`", "text.format")
        return checked("text.format", GrammarSpec("json_schema", json.dumps(self.json_schema, separators=(",", ":"))))


class TextConfig(BaseModel):
    """`text`: the output's format."""

    model_config = ConfigDict(extra="forbid")

    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted; not used.")


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Served model name (see GET /v1/models).")
    input: str | list[InputItem] = Field(description="Text, or message / function_call / function_call_output items.")
    instructions: str | None = Field(None, description="A system turn before the input (not carried to later turns).")
    tools: list[FunctionTool] = Field(default_factory=list, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice = "auto"
    parallel_tool_calls: bool | None = Field(None, description="false: a forced call is exactly one call.")
    text: TextConfig = Field(default_factory=TextConfig)
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict[str, bool] | None = Field(None, description="Accepted (include_obfuscation); not used.")
    store: bool = Field(True, description="Keep the response for previous_response_id and GET (bounded store).")
    previous_response_id: str | None = Field(None, description="Continue the conversation of a stored response.")
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = Field(None, description="Accepted; the prefix cache works by content.")
    prompt_cache_retention: str | None = Field(None, description="Accepted; the prefix cache has its own policy.")
    service_tier: str | None = Field(None, description="Accepted; one tier here.")
    max_tool_calls: int | None = Field(None, ge=1, description="Accepted; it caps built-in tools, none run here.")
    _grammar: GrammarSpec | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _implemented(cls, data: Any) -> Any:
        """Fields this server does not know or implement are a 400 naming each; turned-off ones are dropped."""
        if not isinstance(data, dict):
            return data
        bad = [f"{k} (not a Responses API field)" for k in data if k not in cls.model_fields and
               k not in NOT_IMPLEMENTED]
        bad += [f"{k} ({why})" for k, (off, why) in NOT_IMPLEMENTED.items() if k in data and data[k] not in off and
                not (isinstance(data[k], dict) and all(v is None for v in data[k].values()))]
        if bad:
            raise RequestError(f"unsupported field{'s' if len(bad) > 1 else ''}: {'; '.join(bad)}",
                               bad[0].split(" ")[0])
        return {k: v for k, v in data.items() if k not in NOT_IMPLEMENTED}

    @field_validator("input", mode="before")
    @classmethod
    def _known_items(cls, value: Any) -> Any:
        """Messages, function calls and their outputs, with text parts; anything else is a 400 naming it."""
        for i, item in enumerate(value if isinstance(value, list) else []):
            if not isinstance(item, dict):
                continue
            if item_type(item) not in ITEM_TYPES:
                raise RequestError(f"input[{i}] is a {item_type(item)!r} item; this server reads "
                                   f"{', '.join(ITEM_TYPES)} items", str(i))
            if (bad := unreadable_part(item)) is not None:
                field = "content" if "content" in item else "output"
                raise RequestError(f"input[{i}].{field}[{bad[0]}] is a {bad[1]!r} part; this model reads text "
                                   f"only: send {', '.join(TEXT_PARTS)} parts", f"{i}.{field}.{bad[0]}")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        """Built-in tools (web_search, file_search, ...) run on OpenAI's side: a 400 naming them."""
        built_in = [(i, t.get("type")) for i, t in enumerate(value if isinstance(value, list) else [])
                    if isinstance(t, dict) and t.get("type") != "function"]
        if built_in:
            raise RequestError(f"built-in tools are not supported here: {', '.join(str(t) for _, t in built_in)}; "
                               "send function tools (type 'function') and run them yourself", str(built_in[0][0]))
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice(cls, value: Any) -> Any:
        """Only none, auto, required or one named function can be chosen."""
        if isinstance(value, dict) and value.get("type") != "function":
            raise RequestError(f"tool_choice of type {value.get('type')!r} is not supported; use none, auto, "
                               "required or {'type': 'function', 'name': ...}")
        return value

    @model_validator(mode="after")
    def _served_model_tools_and_format(self, info: ValidationInfo) -> ResponsesRequest:
        """The served model; tool_choice against tools; one output constraint (a forced call's, else text.format)."""
        check_served(self.model, info)
        mode, name = self.tool_mode()
        forced = tool_grammar(self.chat_tools(), mode, name, self.parallel_tool_calls)
        # A forced call leaves no text to format, so its grammar is the one constraint.
        self._grammar = forced[1] if forced is not None else self.text.format.grammar()
        return self

    def chat_tools(self) -> list[Tool] | None:
        """The tools in the chat API's form (None when there are none)."""
        return [t.chat() for t in self.tools] or None

    def tool_mode(self) -> tuple[str, str | None]:
        """(mode, forced function name) as the chat path names them."""
        choice = self.tool_choice
        named = NamedToolChoice(function=NamedFunction(name=choice.name)) if isinstance(choice, FunctionChoice) \
            else choice
        return tool_mode(self.chat_tools(), named)

    def tool_parsers(self) -> Callable[[], ToolOutput] | None:
        """A maker of the tool-call parser of the output (None when tools are off)."""
        mode, name = self.tool_mode()
        return None if mode == "none" else (lambda: ToolOutput(mode, name))

    def params(self) -> GenerationParams:
        """What the replica needs: sampling, the token limit and the output constraint."""
        return GenerationParams(max_tokens=self.max_output_tokens, temperature=self.effective("temperature"),
                                top_p=self.effective("top_p"), grammar=self._grammar)

    def effective(self, name: str) -> float:
        """temperature or top_p as used (1 when not given)."""
        value = getattr(self, name)
        return 1.0 if value is None else value

    def turns(self) -> list[ChatMessage]:
        """This request's input as chat turns (instructions not included)."""
        if isinstance(self.input, str):
            return [ChatMessage(role="user", content=self.input)]
        return chat_turns(self.input)

    def messages(self, turns: list[ChatMessage]) -> list[ChatMessage]:
        """The conversation to render: the instructions (a system turn), then `turns`."""
        return ([ChatMessage(role="system", content=self.instructions)] if self.instructions else []) + turns
