"""OpenAI's Responses API through the official `openai` client and the OpenAI Agents SDK's default Runner, against
a replica of a tiny random model with a Hermes-style tool template (greedy, so every answer is reproducible)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict

from tests.chat_templates import tool_model
from tests.serving import ONE_NODE, SharedServe

pytestmark = pytest.mark.slow
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": CITY,
           "strict": True}
GREEDY: dict[str, Any] = {"model": "tiny", "temperature": 0}


class Forecast(BaseModel):
    """A structured answer (small enough that the grammar ends it well inside the token limit)."""

    model_config = ConfigDict(extra="forbid")

    sky: Literal["sunny", "cloudy", "rain"]
    warm: bool


@pytest.fixture(scope="module")
def url(shared_serve: SharedServe, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One replica of a tiny model whose chat template renders tools, calls and tool results."""
    path = tool_model(tmp_path_factory.mktemp("responses") / "tiny", layers=2, seed=11)
    base = shared_serve.serve(ONE_NODE, {"gridserve": (
        {"model": str(path), "served_model_name": "tiny", "cpus_per_worker": 0.5, "replica_cpus": 0.5,
         "max_model_len": 1024, "max_num_batched_tokens": 2048, "block_size": 4, "kv_cache_memory_bytes": 2**21}, {})})
    httpx.get(f"{base}/health", timeout=60).raise_for_status()
    return base


def test_create_with_a_string_then_retrieve(client: openai.OpenAI) -> None:
    """A string input gives one assistant message with usage; GET returns the stored response unchanged."""
    out = client.responses.create(input="Say hello.", max_output_tokens=8, **GREEDY)
    assert out.id.startswith("resp_") and out.status == "incomplete"  # a random model never stops by itself
    assert out.incomplete_details.reason == "max_output_tokens" and out.usage.output_tokens == 8
    assert [item.type for item in out.output] == ["message"] and out.output_text
    again = client.responses.retrieve(out.id)
    assert again.output_text == out.output_text and again.usage == out.usage


def test_create_with_items_and_instructions(client: openai.OpenAI, url: str) -> None:
    """Message items with text parts and instructions render as the chat template's turns (token count checks)."""
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hi."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!",
                                                                   "annotations": []}]},
             {"role": "user", "content": "Weather?"}]
    out = client.responses.create(input=items, instructions="Be brief.", max_output_tokens=4, store=False, **GREEDY)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather?"}]
    counted = httpx.post(f"{url}/tokenize", json={"messages": chat}, timeout=30).json()["count"]
    assert out.usage.input_tokens == counted and out.instructions == "Be brief."
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(out.id)  # store false


def test_stream_events_in_order_end_with_completed(client: openai.OpenAI) -> None:
    """Typed events from response.created to response.completed (with usage); deltas add up to the text."""
    fmt = {"format": {"type": "json_schema", "name": "forecast", "schema": Forecast.model_json_schema()}}
    with client.responses.stream(input="Forecast?", text=fmt, max_output_tokens=64, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    Forecast.model_validate_json(text)
    assert final.output_text == text and final.usage.output_tokens > 0 and events[-1].response.usage is not None


def test_stream_a_forced_call(client: openai.OpenAI) -> None:
    """A named tool choice streams a function_call item: added, argument deltas, done, item done."""
    choice = {"type": "function", "name": "get_weather"}
    with client.responses.stream(input="Weather?", tools=[WEATHER], tool_choice=choice, max_output_tokens=64,
                                 **GREEDY) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[2] == "response.output_item.added" and "response.function_call_arguments.delta" in kinds
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments)["city"]


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    """`responses.parse(text_format=Model)` returns a parsed object that validates."""
    out = client.responses.parse(input="Forecast for Rome?", text_format=Forecast, max_output_tokens=64, **GREEDY)
    assert isinstance(out.output_parsed, Forecast) and out.status == "completed"


def test_function_tool_round_trip(client: openai.OpenAI) -> None:
    """tool_choice required -> a function_call item; its output fed back (with the call) -> a text answer."""
    first = client.responses.create(input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=64, **GREEDY)  # one call, not a list
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and first.status == "completed" and json.loads(calls[0].arguments)["city"] in CITY["properties"][
        "city"]["enum"]
    history: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}, *[c.model_dump() for c in calls]]
    history += [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny, 21 C"} for c in calls]
    second = client.responses.create(input=history, tools=[WEATHER], tool_choice="none", max_output_tokens=6,
                                     **GREEDY)
    assert [item.type for item in second.output] == ["message"] and second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens  # the call and its result were rendered


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, url: str) -> None:
    """The second turn renders the first turn's input and output before its own input; an unknown id is a 400."""
    first = client.responses.create(input="My name is Ada.", instructions="Be kind.", max_output_tokens=5, **GREEDY)
    second = client.responses.create(input="What is my name?", previous_response_id=first.id, max_output_tokens=5,
                                     **GREEDY)
    chat = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"}]  # instructions are not carried over
    counted = httpx.post(f"{url}/tokenize", json={"messages": chat}, timeout=30).json()["count"]
    assert second.usage.input_tokens == counted and second.previous_response_id == first.id
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input="x", previous_response_id="resp_unknown", **GREEDY)
    assert info.value.body["param"] == "previous_response_id"


@pytest.mark.parametrize("extra, param, word", [
    ({"background": True}, "background", "background"),
    ({"tools": [{"type": "web_search"}]}, "tools.0", "web_search"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate", "frobnicate"),
])
def test_unsupported_fields_are_400s_naming_them(client: openai.OpenAI, extra: dict[str, Any], param: str,
                                                 word: str) -> None:
    """Fields this server does not implement are refused by name, before any generation."""
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input="x", **GREEDY, **extra)
    assert info.value.body["param"] == param and word in info.value.body["message"]


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_sdk_runner_with_a_function_tool(url: str, streamed: bool) -> None:
    """The Agents SDK's default model (Responses API): a forced tool call, the tool's result, a typed answer;
    `Runner.run` and `Runner.run_streamed` (the typed events)."""
    agents = pytest.importorskip("agents")
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome", "Oslo"]) -> str:
        """Today's weather in a city."""
        seen.append(city)
        return f"{city}: sunny, 21 C"

    agents.set_tracing_disabled(True)  # traces would go to OpenAI's servers
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0),
                                     use_for_tracing=False)
    # A random model calls no tool by itself: force one call; the SDK resets tool_choice after it.
    settings = agents.ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64)
    agent = agents.Agent(name="weather", instructions="Answer with the forecast.", model="tiny", tools=[get_weather],
                         output_type=Forecast, model_settings=settings)
    result = asyncio.run(run_streamed(agents, agent)) if streamed else agents.Runner.run_sync(agent, "Weather?")
    assert seen and isinstance(result.final_output, Forecast)
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]


async def run_streamed(agents: Any, agent: Any) -> Any:
    """Runner.run_streamed to the end (its events consumed)."""
    result = agents.Runner.run_streamed(agent, "Weather?")
    async for _ in result.stream_events():
        pass
    return result
