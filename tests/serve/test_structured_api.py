"""Structured outputs, tool calls, content parts and usage in streams, through the official `openai` client and
langchain-openai, against a tp=2 x pp=2 replica of a tiny random model with a Hermes-style tool template."""
from __future__ import annotations

import json
import random
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.chat_templates import tool_model
from tests.json_schemas import random_schema
from tests.serving import ONE_NODE, SharedServe

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}


class Pet(BaseModel):
    """A structured answer the clients parse."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=8)
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)


@pytest.fixture(scope="module")
def url(shared_serve: SharedServe, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tp=2 x pp=2 replica of a tiny model whose chat template knows tools."""
    path = tool_model(tmp_path_factory.mktemp("tools") / "tiny", layers=4, seed=7)
    base = shared_serve.serve(ONE_NODE, {"gridserve": (
        {"model": str(path), "served_model_name": "tiny", "tensor_parallel_size": 2, "pipeline_parallel_size": 2,
         "cpus_per_worker": 0.5, "replica_cpus": 0.5, "max_model_len": 512, "max_num_batched_tokens": 1024,
         "block_size": 4, "kv_cache_memory_bytes": 2**21}, {})})
    httpx.get(f"{base}/health", timeout=30).raise_for_status()
    return base


USER = [{"role": "developer", "content": "Answer in JSON."},
        {"role": "user", "content": [{"type": "text", "text": "Describe a pet."}]}]


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    """`chat.completions.parse(response_format=Model)` returns parsed, valid objects for every choice."""
    out = client.chat.completions.parse(model="tiny", messages=USER, response_format=Pet, n=2, max_tokens=120,
                                        seed=1, metadata={"team": "a"}, store=False, user="u1")
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pet)


def test_stream_with_include_usage(client: openai.OpenAI) -> None:
    """Streamed structured output: content validates per choice, the last chunk carries usage only."""
    schema = Pet.model_json_schema()
    stream = client.chat.completions.create(
        model="tiny", messages=USER, n=2, max_completion_tokens=120, stream=True,
        stream_options={"include_usage": True}, response_format={"type": "json_schema", "json_schema": {
            "name": "pet", "schema": schema, "strict": True}})
    chunks = list(stream)
    texts = ["", ""]
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    for text in texts:
        Pet.model_validate_json(text)


@pytest.mark.parametrize("stream", [False, True])
def test_random_schemas_always_validate(client: openai.OpenAI, stream: bool) -> None:
    """Property: for many random schemas (n=2), every finished output parses and validates."""
    rng = random.Random(11 + stream)
    for _ in range(4):
        schema = random_schema(rng, depth=1)
        kwargs = dict(model="tiny", messages=USER, n=2, max_tokens=300, temperature=1.0,
                      extra_body={"guided_json": schema} if rng.random() < 0.5 else {},
                      response_format=None)
        if not kwargs["extra_body"]:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if stream:
            texts, reasons = ["", ""], [None, None]
            for c in client.chat.completions.create(stream=True, **kwargs):
                for ch in c.choices:
                    texts[ch.index] += ch.delta.content or ""
                    reasons[ch.index] = ch.finish_reason or reasons[ch.index]
        else:
            out = client.chat.completions.create(**kwargs)
            texts, reasons = [c.message.content for c in out.choices], [c.finish_reason for c in out.choices]
        for text, reason in zip(texts, reasons):
            assert reason == "stop", (schema, text)
            jsonschema.validate(json.loads(text), schema)


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    """Named choice -> a valid call; the call and its result go back in history -> an answer."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})}]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                            max_tokens=8)
    assert second.choices[0].message.tool_calls is None and second.choices[0].finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and the result were rendered


def test_required_and_auto_tool_calls(client: openai.OpenAI) -> None:
    """`required` yields calls under the schema; `auto` parses Hermes blocks, streamed as deltas."""
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                         tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                         max_tokens=80)
    assert out.choices[0].finish_reason == "tool_calls" and len(out.choices[0].message.tool_calls) == 1
    jsonschema.validate(json.loads(out.choices[0].message.tool_calls[0].function.arguments),
                        WEATHER["function"]["parameters"])
    # A random model never chooses to call on its own: a regex makes it write one Hermes block.
    block = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}</tool_call>'
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER], stream=True, extra_body={"guided_regex": block},
                                            max_tokens=80)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    args = json.loads("".join(tc.function.arguments or "" for tc in calls))
    assert args["city"] in ("Paris", "Rome")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(d.content or "" for d in deltas).strip()


def test_langchain_structured_output_and_tools(url: str) -> None:
    """langchain-openai's ChatOpenAI: `.with_structured_output(Model)` and `.bind_tools(...)`."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="tiny", max_tokens=120, max_retries=0)
    pet = llm.with_structured_output(Pet).invoke("Describe a pet.")
    assert isinstance(pet, Pet)
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Rome?")
    assert msg.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(msg.tool_calls[0]["args"], WEATHER["function"]["parameters"])


def test_logit_bias_and_tokenize_routes(url: str, client: openai.OpenAI) -> None:
    """A +100 bias forces a token; /tokenize and /detokenize round-trip; /v1/models lists max_model_len."""
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": "the cat"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "the cat"
    chat = httpx.post(f"{url}/tokenize", json={"messages": USER}).json()
    assert chat["count"] > tokens["count"]
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0,
                                    logit_bias={str(tokens["tokens"][-1]): 100})
    assert out.choices[0].text == " cat" * 4 or out.choices[0].text == "cat" * 4
    assert client.models.list().data[0].model_extra["max_model_len"] == 512


def test_completions_take_constraints_too(client: openai.OpenAI) -> None:
    """/v1/completions honours guided_choice and structured_outputs.regex, n=3."""
    out = client.completions.create(model="tiny", prompt="pick:", max_tokens=20, n=3,
                                    extra_body={"guided_choice": ["left", "right"]})
    assert all(c.text in ("left", "right") and c.finish_reason == "stop" for c in out.choices)
    out = client.completions.create(model="tiny", prompt="code:", max_tokens=20, n=2,
                                    extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}"}})
    assert all(len(c.text) == 4 and c.text[:2].isupper() and c.text[2:].isdigit() for c in out.choices)


@pytest.mark.parametrize("extra,param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages.0.content.0"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"guided_regex": "a(", "stream": True}, "guided_regex"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
])
def test_unsupported_or_invalid_is_a_400_naming_the_param(url: str, extra: dict, param: str) -> None:
    """OpenAI's error envelope with `param` set."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
