"""Tool calling: the grammar that forces calls (`required`, named), and turning generated text into OpenAI
`tool_calls`, whole or as stream deltas.

Formats parsed with `tool_choice: auto`: Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks, as the chat templates of Qwen2/Qwen2.5, SmolLM2/3 and Hermes models ask for (several blocks = parallel
calls; text before the first block is the message content).
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from cluster.request import RequestError
from cluster.structured import GrammarSpec
from deployments.openai_extras import NamedToolChoice, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
EMPTY_PARAMS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_mode(tools: list[Tool] | None, choice: Any) -> tuple[str, str | None]:
    """(mode, forced function name): mode is 'none', 'auto', 'required' or 'named'; checks choice vs tools."""
    if isinstance(choice, NamedToolChoice):
        names = [t.function.name for t in tools or []]
        if choice.function.name not in names:
            raise RequestError(f"tool_choice names function {choice.function.name!r}, which is not in tools "
                             f"({names or 'none given'})", "tool_choice")
        return "named", choice.function.name
    if not tools:
        if choice == "required":
            raise RequestError("tool_choice 'required' needs a non-empty `tools` list", "tool_choice")
        return "none", None
    return choice or "auto", None


def params_schema(tool: Tool) -> dict[str, Any]:
    """A function's argument schema (an empty object when it takes none)."""
    return tool.function.parameters or EMPTY_PARAMS


def tool_grammar(tools: list[Tool] | None, mode: str, name: str | None,
                 parallel: bool | None) -> tuple[str, GrammarSpec] | None:
    """The grammar a forced tool choice generates under: the arguments (named) or a list of calls (required)."""
    if mode == "named":
        tool = next(t for t in tools or [] if t.function.name == name)
        return "tool_choice", GrammarSpec("json_schema", json.dumps(params_schema(tool)))
    if mode != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": params_schema(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools or []]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if parallel is False:
        schema["maxItems"] = 1
    return "tool_choice", GrammarSpec("json_schema", json.dumps(schema))


def call_delta(index: int, name: str, arguments: str) -> dict[str, Any]:
    """The opening delta of a tool call (OpenAI's shape: index, id, type, name), with `arguments` so far."""
    return {"tool_calls": [{"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


def call_deltas(index: int, name: str, arguments: str) -> list[dict[str, Any]]:
    """A whole call as OpenAI streams it: the opening delta, then the arguments."""
    return [call_delta(index, name, ""), {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}]


class ToolOutput:
    """Turns one choice's text deltas into chat deltas (content and/or tool calls) for a tool mode."""

    def __init__(self, mode: str, name: str | None = None) -> None:
        self.mode, self.name = mode, name
        self.buffer = ""  # auto: text that may still become a call; required: the whole JSON
        self.calls = 0
        self.started = False  # named: the call's header delta went out

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Chat deltas for newly generated text."""
        if self.mode == "named":
            out = [] if self.started else [call_delta(0, self.name or "", "")]
            self.started = True
            return out + ([{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}] if text else [])
        self.buffer += text
        return self._drain() if self.mode == "auto" else []

    def finish(self, reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """Deltas still held back and the finish reason (`tool_calls` once a call was made)."""
        if self.mode == "named":
            return self.feed("") if not self.started else [], reason
        if self.mode == "required":
            out = self._required_calls()
        else:
            out = self._drain()
            if self.buffer:  # an unclosed block: a call if its JSON is whole, else plain text
                call = self._parse(self.buffer[len(OPEN):]) if self.buffer.startswith(OPEN) else None
                out += call if call is not None else [{"content": self.buffer}]
                self.buffer = ""
        return out, "tool_calls" if self.calls and reason == "stop" else reason

    def _drain(self) -> list[dict[str, Any]]:
        """Auto mode: emit text that cannot start a call, and every closed call block."""
        out: list[dict[str, Any]] = []
        while self.buffer:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = next((k for k in range(len(OPEN) - 1, 0, -1) if self.buffer.endswith(OPEN[:k])), 0)
                text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                if text:
                    out.append({"content": text})
                break
            if start > 0:
                out.append({"content": self.buffer[:start]})
                self.buffer = self.buffer[start:]
            end = self.buffer.find(CLOSE)
            if end < 0:
                break  # the block is still being generated
            body, self.buffer = self.buffer[len(OPEN):end], self.buffer[end + len(CLOSE):]
            call = self._parse(body)
            out += call if call is not None else [{"content": OPEN + body + CLOSE}]
        return out

    def _parse(self, body: str) -> list[dict[str, Any]] | None:
        """Call deltas from a block's JSON ({"name", "arguments"}), or None when it is not one."""
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        self.calls += 1
        return call_deltas(self.calls - 1, obj["name"], args if isinstance(args, str) else json.dumps(args))

    def _required_calls(self) -> list[dict[str, Any]]:
        """Required mode: the generated JSON list of {name, arguments} as call deltas."""
        try:
            items = json.loads(self.buffer)
        except json.JSONDecodeError:
            return [{"content": self.buffer}] if self.buffer else []  # cut short by max_tokens
        self.calls = len(items)
        return [d for i, c in enumerate(items) for d in call_deltas(i, c["name"], json.dumps(c["arguments"]))]


def merge(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole assistant message from chat deltas (non-streamed responses)."""
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            if c["index"] not in calls:
                calls[c["index"]] = {k: v for k, v in c.items() if k != "index"}
                calls[c["index"]]["function"] = dict(c["function"])
            else:
                calls[c["index"]]["function"]["arguments"] += c["function"].get("arguments", "")
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message
