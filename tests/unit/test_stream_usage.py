"""stream_options.include_usage: the SSE stream ends with a usage chunk (what `vllm bench serve` counts tokens by)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from cluster.request import ChoiceDelta, GenerationParams
from deployments.openai_schema import CompletionRequest
from deployments.remote_stream import ChunkStream
from deployments.responses import sse


async def replica(lengths: list[int]) -> AsyncIterator[list[ChoiceDelta]]:
    """What a replica sends for choices of these lengths: the acceptance, then one token of each choice per chunk
    (the last with finish reason 'length'); every choice's first delta says 4 prompt tokens came from the cache."""
    yield []
    for t in range(max(lengths)):
        yield [ChoiceDelta(i, chr(97 + t), [t], "length" if t == n - 1 else None, cached_tokens=4 if t == 0 else None)
               for i, n in enumerate(lengths) if t < n]


def frames(usage_prompt_len: int | None) -> list[dict | str]:
    """Every SSE frame of a 2-choice stream (3 and 2 tokens), JSON-decoded except [DONE]."""
    async def run() -> list[str]:
        chunks = await ChunkStream(replica([3, 2]), GenerationParams(n=2)).start()
        return [f async for f in sse(chunks, 2, "cmpl-1", "m", False, None, usage_prompt_len)]

    out = []
    for f in asyncio.run(run()):
        body = f.removeprefix("data: ").strip()
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


def test_usage_chunk_comes_last_before_done() -> None:
    """Text frames per choice in order, then usage (tokens of both choices), then [DONE]."""
    got = frames(7)
    texts = {i: "".join(f["choices"][0]["text"] for f in got[:-2] if f["choices"][0]["index"] == i) for i in (0, 1)}
    assert texts == {0: "abc", 1: "ab"}
    assert got[-1] == "[DONE]"
    usage = got[-2]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                              "prompt_tokens_details": {"cached_tokens": 4}}
    assert all("usage" not in f for f in got[:-2])


def test_no_usage_chunk_unless_asked() -> None:
    """Without include_usage the stream ends with [DONE] and carries no usage."""
    got = frames(None)
    assert got[-1] == "[DONE]"
    assert all("usage" not in f for f in got[:-1])


def test_stream_options_schema() -> None:
    """include_usage parses; an unknown stream option is refused."""
    req = CompletionRequest(model="m", prompt="hi", stream=True, stream_options={"include_usage": True})
    assert req.stream_options is not None and req.stream_options.include_usage
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="hi", stream_options={"include_usage": True, "bogus": 1})
