"""Tool-call parsing (Hermes-style blocks, forced calls) and chat message rendering, without a server."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cluster.request import RequestError
from deployments.chat import template_messages
from deployments.http import request_error_in
from deployments.openai_extras import ChatMessage, NamedToolChoice, Tool
from deployments.openai_schema import ChatRequest
from deployments.tools import ToolOutput, merge, tool_grammar, tool_mode

TOOLS = [Tool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
    Tool.model_validate({"type": "function", "function": {"name": "now"}})]
TEXT = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "now", "arguments": {}}</tool_call>')


def run_chunks(parser: ToolOutput, text: str, size: int) -> tuple[list[dict], str | None]:
    """Feed `text` in chunks of `size` characters, then finish with 'stop'."""
    deltas = []
    for i in range(0, len(text), size):
        deltas += parser.feed(text[i:i + size])
    tail, reason = parser.finish("stop")
    return deltas + tail, reason


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_hermes_blocks_become_tool_calls_however_the_text_is_split(size: int) -> None:
    """Content before the blocks stays content; each block is one call with JSON-string arguments."""
    deltas, reason = run_chunks(ToolOutput("auto"), TEXT, size)
    message = merge(deltas)
    assert reason == "tool_calls"
    assert message["content"].strip() == "Let me check."
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert not any("<tool_call" in d.get("content", "") for d in deltas)  # never leaked as text while streaming
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]  # OpenAI's stream shape: header, then args
    assert [("id" in c, c["function"].get("name")) for c in calls] == [(True, "get_weather"), (False, None),
                                                                       (True, "now"), (False, None)]
    assert calls[0]["function"]["arguments"] == ""
    assert calls[1] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}


def test_plain_text_and_broken_blocks_stay_content() -> None:
    """No block: content and the model's finish reason; a block that is not a call comes back as text."""
    deltas, reason = run_chunks(ToolOutput("auto"), "Just <tool text> here", 2)
    assert merge(deltas) == {"role": "assistant", "content": "Just <tool text> here"} and reason == "stop"
    deltas, reason = run_chunks(ToolOutput("auto"), "<tool_call>not json</tool_call>", 4)
    assert merge(deltas)["content"] == "<tool_call>not json</tool_call>" and reason == "stop"
    deltas, reason = run_chunks(ToolOutput("auto"), '<tool_call>{"name": "now", "arguments": {}}', 5)
    assert merge(deltas)["tool_calls"][0]["function"]["name"] == "now"  # unclosed at EOS, JSON whole


def test_forced_calls() -> None:
    """Named: the text is the arguments (finish 'stop', as OpenAI); required: a JSON list of calls."""
    deltas, reason = run_chunks(ToolOutput("named", "get_weather"), '{"city": "Rome"}', 4)
    message = merge(deltas)
    assert reason == "stop" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    text = '[{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    deltas, reason = run_chunks(ToolOutput("required"), text, 6)
    assert reason == "tool_calls" and [c["function"]["name"] for c in merge(deltas)["tool_calls"]] == [
        "now", "get_weather"]


def test_tool_choice_checks_and_grammars() -> None:
    """A named choice must be in tools; required needs tools; forced choices compile to valid grammars."""
    choice = NamedToolChoice.model_validate({"type": "function", "function": {"name": "nope"}})
    with pytest.raises(RequestError, match="nope"):
        tool_mode(TOOLS, choice)
    with pytest.raises(RequestError, match="required"):
        tool_mode(None, "required")
    assert tool_mode(None, None) == ("none", None) and tool_mode(TOOLS, None) == ("auto", None)
    for mode, name in [("named", "get_weather"), ("required", None)]:
        param, spec = tool_grammar(TOOLS, mode, name, False)
        assert spec.error() is None
    assert refusal({"response_format": {"type": "json_object"}, "guided_regex": "a+"}).param == "guided_regex"


def test_messages_render_for_templates() -> None:
    """Parts joined, developer -> system, tool calls with decoded arguments, tool turns keep their id;
    an image part is a 400 naming it."""
    msgs = [ChatMessage.model_validate(m) for m in [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "ok"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "now", "arguments": "{}"}}]},
        {"role": "tool", "content": "12:00", "tool_call_id": "c1"}]]
    out = template_messages(msgs)
    assert out[0] == {"role": "system", "content": "be brief\nok"}
    assert out[1]["tool_calls"][0]["function"] == {"name": "now", "arguments": {}} and out[1]["content"] == ""
    assert out[2] == {"role": "tool", "content": "12:00", "tool_call_id": "c1"}
    image = refusal({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert "image_url" in str(image) and image.param == "messages.0.content.1"
    unanswered = refusal({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "12:00"}]})
    assert unanswered.param == "messages.1.tool_call_id"
    wrong_model = refusal({"model": "other"}, served="m")
    assert wrong_model.status == 404 and wrong_model.param == "model" and wrong_model.code == "model_not_found"


def refusal(fields: dict, served: str | None = None) -> RequestError:
    """The RequestError (param as the HTTP answer names it) a chat body with these fields is refused with."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
    with pytest.raises(ValidationError) as err:
        ChatRequest.model_validate(body, context={"served_model": served})
    found = request_error_in(err.value.errors())
    assert found is not None, err.value
    return found
