"""The Responses API without a server: request checks, output items and events validated against the pinned
`openai` client's own pydantic types, and the bounded response store."""
from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from cluster.request import ChoiceDelta, RequestError
from deployments.http import request_error_in
from deployments.response_events import OutputBuilder, response_body
from deployments.response_store import BoundedStore
from deployments.responses_api import ResponsesRequest
from deployments.tools import ToolOutput

EVENTS = TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]}, "strict": True}


def parse(body: dict[str, Any]) -> ResponsesRequest:
    """Validate a body as the ingress does (served model 'tiny')."""
    return ResponsesRequest.model_validate_json(json.dumps({"model": "tiny", **body}),
                                                context={"served_model": "tiny"})


def refusal(body: dict[str, Any]) -> RequestError:
    """The RequestError (with its full param) a bad body raises."""
    with pytest.raises(ValidationError) as info:
        parse(body)
    found = request_error_in(info.value.errors())
    assert found is not None, info.value.errors()
    return found


@pytest.mark.parametrize("body, param, words", [
    ({"input": "x", "background": True}, "background", ["background", "foreground"]),
    ({"input": "x", "frobnicate": 1, "conversation": "c"}, "frobnicate", ["frobnicate", "conversation"]),
    ({"input": "x", "tools": [TOOL, {"type": "web_search"}, {"type": "file_search"}]}, "tools.1",
     ["web_search", "file_search"]),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice", ["file_search"]),
    ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}, "tools": [TOOL]}, "tool_choice", ["nope"]),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0", ["reasoning"]),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input.0.content.0",
     ["input_image"]),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include", ["include"]),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nonsense"}}}},
     "text.format", ["text.format"]),
    ({"model": "other", "input": "x"}, "model", ["other"]),
])
def test_unsupported_or_bad_fields_are_named(body: dict[str, Any], param: str, words: list[str]) -> None:
    """Each bad body is a 4xx whose param and message name the field or value."""
    found = refusal(body)
    assert found.param == param and all(w in str(found) for w in words), (found.param, str(found))


def test_turned_off_fields_are_accepted() -> None:
    """Fields set to their 'off' value (as SDKs send them) pass."""
    req = parse({"input": "x", "background": False, "include": [], "reasoning": {"effort": None},
                 "truncation": "disabled", "store": False})
    assert req.params().grammar is None and not req.store


def test_items_become_chat_turns() -> None:
    """Messages, a call and its output become system/user/assistant(tool_calls)/tool turns."""
    req = parse({"instructions": "Be brief.", "tools": [TOOL], "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}",
         "id": "fc_1", "status": "completed"},
        {"type": "function_call_output", "call_id": "c1", "output": "cold"}]})
    turns = req.messages(req.turns())
    assert [m.role for m in turns] == ["system", "user", "assistant", "tool"]
    assert turns[2].tool_calls[0].id == "c1" and turns[3].tool_call_id == "c1" and turns[3].content == "cold"


def deltas(texts: list[str], reason: str) -> list[ChoiceDelta]:
    """One choice's deltas, one token each, the last with `reason`."""
    return [ChoiceDelta(0, t, [1], reason if i == len(texts) - 1 else None) for i, t in enumerate(texts)]


def run(builder: OutputBuilder, texts: list[str], reason: str) -> list[dict[str, Any]]:
    """Feed the deltas; every event must validate as the openai client's event type."""
    events = [e for d in deltas(texts, reason) for e in builder.feed(d)]
    for n, event in enumerate(events):
        EVENTS.validate_python({**event, "sequence_number": n})
    return events


def test_text_events_and_body_match_the_openai_types() -> None:
    """Plain text: added, part added, deltas, text done, part done, item done; the body validates as Response."""
    builder = OutputBuilder(None)
    events = run(builder, ["Hel", "lo"], "stop")
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done"]
    body = Response.model_validate(response_body("resp_1", 1.0, parse({"input": "x"}), builder, 5))
    assert body.output_text == "Hello" and body.status == "completed" and body.usage.total_tokens == 7


def test_forced_call_events_and_length_cut() -> None:
    """A required call streams as a function_call item; a cut-short text is an incomplete response."""
    builder = OutputBuilder(ToolOutput("required"))
    events = run(builder, ['[{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}]'], "stop")
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]
    assert json.loads(events[-1]["item"]["arguments"]) == {"city": "Oslo"}
    cut = OutputBuilder(None)
    run(cut, ["a", "b"], "length")
    body = Response.model_validate(response_body("resp_2", 1.0, parse({"input": "x"}), cut, 3))
    assert body.status == "incomplete" and body.incomplete_details.reason == "max_output_tokens"


def test_store_evicts_oldest_by_count_bytes_and_age() -> None:
    """Count and byte limits evict the oldest first; a read past the age limit finds nothing."""
    store = BoundedStore(max_items=2, max_bytes=10, max_age_s=60)
    store.put("a", b"1234", now=0)
    store.put("b", b"1234", now=1)
    store.put("c", b"12", now=2)
    assert store.get("a", now=3) is None and store.get("b", now=3) == b"1234"  # count: a went first
    store.put("d", b"123456789", now=4)  # 4 + 2 + 9 bytes > 10: b goes, then c
    assert store.get("b", now=5) is None and store.get("c", now=5) is None and store.bytes == 9
    assert not store.put("e", b"x" * 11) and store.get("d", now=65) is None  # too big; expired


def test_a_failed_generation_is_a_failed_response() -> None:
    """A replica lost mid-way: status failed with the error, no output; the body still validates."""
    builder = OutputBuilder(None)
    builder.feed(ChoiceDelta(0, "Hi", [1]))
    builder.feed(ChoiceDelta(0, "", [], "error", error="model replica lost"))
    body = Response.model_validate(response_body("resp_3", 1.0, parse({"input": "x"}), builder, 2))
    assert body.status == "failed" and "model replica lost" in body.error.message and body.output == []
