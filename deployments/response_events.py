"""Responses API output built from one choice's `ChoiceDelta`s: output items (an assistant message, function calls
parsed by `deployments.tools.ToolOutput`), the response object, and the typed stream events on the way."""
from __future__ import annotations

import copy
import json
import time
import uuid
from typing import Any

from cluster.request import ChoiceDelta
from deployments.responses import chat_parts
from deployments.responses_api import ResponsesRequest
from deployments.tools import ToolOutput

Event = dict[str, Any]


def item_id(prefix: str) -> str:
    """An OpenAI-style id (resp_, msg_, fc_)."""
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputBuilder:
    """One choice's deltas -> output items; `feed` returns the stream events each delta makes (unnumbered)."""

    def __init__(self, parser: ToolOutput | None) -> None:
        self.parser = parser
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being generated (the last of `items`)
        self.calls: dict[int, dict[str, Any]] = {}  # tool-call index -> its function_call item
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.output_tokens = self.cached_tokens = 0

    def feed(self, delta: ChoiceDelta) -> list[Event]:
        """Events for one delta; the last delta closes the open item (an empty answer is an empty message)."""
        self.output_tokens += len(delta.token_ids)
        if delta.cached_tokens is not None:
            self.cached_tokens = delta.cached_tokens
        if delta.finish_reason == "error":
            self.finish_reason, self.error = "error", delta.error or "generation failed"
            return []
        parts, reason = chat_parts(self.parser, delta)
        events = [e for part in parts for e in self._part(part)]
        if reason is not None:
            self.finish_reason = reason
            events += self._close() if self.items else self._open_message() + self._close()
        return events

    def _part(self, part: dict[str, Any]) -> list[Event]:
        """Events for one chat delta: text, or a call's opening and argument pieces."""
        events: list[Event] = []
        if part.get("content"):
            if self.open is None or self.open["type"] != "message":
                events += self._close() + self._open_message()
            assert self.open is not None
            self.open["content"][0]["text"] += part["content"]
            events.append({"type": "response.output_text.delta", **self._where(), "content_index": 0,
                           "delta": part["content"], "logprobs": []})
        for call in part.get("tool_calls", []):
            if "id" in call:
                events += self._close() + self._open_call(call["index"], call["id"], call["function"]["name"])
            args = call["function"].get("arguments", "")
            if args:
                item = self.calls[call["index"]]
                item["arguments"] += args
                events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                               "output_index": self.items.index(item), "delta": args})
        return events

    def _where(self) -> dict[str, Any]:
        """item_id and output_index of the open item."""
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def _open_message(self) -> list[Event]:
        self.open = {"id": item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                     "content": []}
        self.items.append(self.open)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        added = {"type": "response.output_item.added", "output_index": len(self.items) - 1,
                 "item": copy.deepcopy(self.open)}
        self.open["content"].append(part)
        return [added, {"type": "response.content_part.added", **self._where(), "content_index": 0,
                        "part": dict(part)}]

    def _open_call(self, index: int, call_id: str, name: str) -> list[Event]:
        self.open = {"id": item_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
                     "arguments": "", "status": "in_progress"}
        self.items.append(self.open)
        self.calls[index] = self.open
        return [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                 "item": dict(self.open)}]

    def _close(self) -> list[Event]:
        """Finish the open item: its done events (incomplete when cut short by max_output_tokens)."""
        if self.open is None:
            return []
        item, where = self.open, self._where()
        item["status"] = "incomplete" if self.finish_reason == "length" else "completed"
        self.open = None
        if item["type"] == "function_call":
            events = [{"type": "response.function_call_arguments.done", **where, "arguments": item["arguments"]}]
        else:
            part = item["content"][0]
            events = [{"type": "response.output_text.done", **where, "content_index": 0, "text": part["text"],
                       "logprobs": []},
                      {"type": "response.content_part.done", **where, "content_index": 0, "part": dict(part)}]
        return events + [{"type": "response.output_item.done", "output_index": where["output_index"],
                          "item": copy.deepcopy(item)}]

    def status(self) -> str:
        """The response's status once the choice ended."""
        if self.finish_reason == "error":
            return "failed"
        return "incomplete" if self.finish_reason == "length" else "completed"

    def assistant_turn(self) -> dict[str, Any]:
        """The output as one chat assistant turn (what a later turn's history holds)."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        turn: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            turn["tool_calls"] = calls
        return turn


def echo(req: ResponsesRequest) -> dict[str, Any]:
    """The request's settings as the response object repeats them."""
    choice = req.tool_choice if isinstance(req.tool_choice, str) else req.tool_choice.model_dump()
    return {"model": req.model, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "temperature": req.effective("temperature"),
            "top_p": req.effective("top_p"), "tool_choice": choice, "tools": [t.model_dump() for t in req.tools],
            "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}, "store": req.store,
            "truncation": "disabled", "background": False, "reasoning": None, "user": req.user,
            "safety_identifier": req.safety_identifier, "prompt_cache_key": req.prompt_cache_key,
            "service_tier": "default", "top_logprobs": 0}


def response_body(rid: str, created: float, req: ResponsesRequest, builder: OutputBuilder | None,
                  input_tokens: int) -> dict[str, Any]:
    """The response object: in progress (no builder yet) or as the choice ended, with usage."""
    status = "in_progress" if builder is None else builder.status()
    body: dict[str, Any] = {"id": rid, "object": "response", "created_at": created, "status": status,
                            "error": None, "incomplete_details": None, "output": [], "usage": None, **echo(req)}
    if builder is None:
        return body
    body["output"] = copy.deepcopy(builder.items) if status != "failed" else []
    if status == "completed":
        body["completed_at"] = time.time()
    elif status == "incomplete":
        body["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        body["error"] = {"code": "server_error", "message": f"generation failed: {builder.error}; retry"}
    body["usage"] = {"input_tokens": input_tokens, "output_tokens": builder.output_tokens,
                     "total_tokens": input_tokens + builder.output_tokens,
                     "input_tokens_details": {"cached_tokens": builder.cached_tokens, "cache_write_tokens": 0},
                     "output_tokens_details": {"reasoning_tokens": 0}}
    return body


class EventWriter:
    """Numbers events and frames them as server-sent events (`event:` names the type, as OpenAI sends them)."""

    def __init__(self) -> None:
        self.sequence = 0

    def frame(self, event: Event) -> str:
        """One SSE frame."""
        event["sequence_number"] = self.sequence
        self.sequence += 1
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


TERMINAL = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}
