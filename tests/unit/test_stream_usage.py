"""stream_options.include_usage: the SSE stream ends with a usage chunk (what `vllm bench serve` counts tokens by)."""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import pytest
from pydantic import ValidationError

from cluster.detokenize import TextStream
from cluster.engine import TokenEvent
from deployments.openai_schema import CompletionRequest
from deployments.responses import sse


class CharTokenizer:
    """Token id i decodes to chr(97 + i): enough for TextStream."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Letters for ids."""
        return "".join(chr(97 + i) for i in ids)


async def events(n: int) -> AsyncIterator[TokenEvent]:
    """n tokens, the last one with finish reason 'length'; the first says 4 prompt tokens came from the cache."""
    for i in range(n):
        yield TokenEvent(i, "length" if i == n - 1 else None, cached_tokens=4 if i == 0 else None)


def frames(usage_prompt_len: int | None) -> list[dict | str]:
    """Every SSE frame of a 2-choice stream (3 and 2 tokens), JSON-decoded except [DONE]."""
    async def run() -> list[str]:
        streams = [TextStream(events(3), CharTokenizer(), []), TextStream(events(2), CharTokenizer(), [])]
        return [f async for f in sse(streams, CharTokenizer(), "cmpl-1", "m", False, None, usage_prompt_len)]

    out = []
    for f in asyncio.run(run()):
        body = f.removeprefix("data: ").strip()
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


def test_usage_chunk_comes_last_before_done() -> None:
    got = frames(7)
    assert got[-1] == "[DONE]"
    usage = got[-2]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                              "prompt_tokens_details": {"cached_tokens": 4}}
    assert all("usage" not in f for f in got[:-2])


def test_no_usage_chunk_unless_asked() -> None:
    got = frames(None)
    assert got[-1] == "[DONE]"
    assert all("usage" not in f for f in got[:-1])


def test_stream_options_schema() -> None:
    req = CompletionRequest(model="m", prompt="hi", stream=True, stream_options={"include_usage": True})
    assert req.stream_options is not None and req.stream_options.include_usage
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="hi", stream_options={"include_usage": True, "bogus": 1})
