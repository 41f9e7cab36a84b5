"""OpenAI response bodies and SSE chunks built from a request's `ChoiceDelta` chunks (n choices, logprobs, tools)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from cluster.generate import Choice, collect
from cluster.request import ChoiceDelta, TokenLogprob
from deployments.openai_schema import error_body, now
from deployments.remote_stream import ChunkStream
from deployments.tools import ToolOutput, merge

ToolFactory = Callable[[], ToolOutput] | None  # a fresh tool-call parser per choice (chat with tools)


def logprobs_body(items: list[TokenLogprob], chat: bool) -> dict[str, Any] | None:
    """OpenAI's logprobs object for some tokens of a choice (None if none were asked)."""
    if not items:
        return None
    if chat:
        return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]}
                            for lp in items]}
    return {"tokens": [lp.token for lp in items], "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [dict(lp.top) for lp in items], "text_offset": []}


def choice_body(index: int, choice: Choice, chat: bool, tools: ToolFactory = None) -> dict[str, Any]:
    """One choice of a whole (non-streamed) response; with tools, calls in the text become `tool_calls`."""
    reason = choice.finish_reason
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if chat and tools is not None:
        parser = tools()
        deltas = parser.feed(choice.text)
        tail, reason = parser.finish(reason)
        message = merge(deltas + tail)
    body: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs_body(choice.logprobs, chat)}
    body.update({"message": message} if chat else {"text": choice.text})
    return body


def usage(prompt_len: int, completion: int, cached: int) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache served (first choice's admission)."""
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def whole_response(chunks: ChunkStream, n: int, rid: str, model: str, chat: bool, prompt_len: int,
                         tools: ToolFactory = None) -> tuple[dict[str, Any] | None, str | None]:
    """Run every choice to the end; returns (response body, error message of a failed choice)."""
    try:
        choices = await collect(chunks, n)
    finally:
        chunks.cancel()  # a no-op once the replica finished; aborts its generation if the client left early
    failed = next((c.error for c in choices if c.error), None)
    if failed:
        return None, failed
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(), "model": model,
            "choices": [choice_body(i, c, chat, tools) for i, c in enumerate(choices)],
            "usage": usage(prompt_len, sum(len(c.token_ids) for c in choices), choices[0].cached_tokens)}, None


def event(payload: dict[str, Any]) -> str:
    """One SSE frame."""
    return f"data: {json.dumps(payload)}\n\n"


def chat_parts(parser: ToolOutput | None, delta: ChoiceDelta) -> tuple[list[dict[str, Any]], str | None]:
    """A choice's chat deltas for new text (tool calls parsed out when tools are on) and its finish reason."""
    text, reason = delta.text, delta.finish_reason
    if parser is None:  # a token whose text waits still gets its (empty) chunk
        return ([{"content": text}] if text or delta.token_ids else []), reason
    parts = parser.feed(text)
    if reason is None or reason == "error":
        return parts, reason
    tail, reason = parser.finish(reason)
    return parts + tail, reason


async def sse(chunks: ChunkStream, n: int, rid: str, model: str, chat: bool, tools: ToolFactory = None,
              usage_prompt: int | None = None) -> AsyncIterator[str]:
    """Server-sent events for n choices interleaved as they produce text, then (if `usage_prompt` is given) a
    usage chunk without choices, then `data: [DONE]`."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    parsers = [tools() if chat and tools is not None else None for _ in range(n)]
    completion, cached = 0, 0

    def frame(index: int, part: dict[str, Any], lps: dict[str, Any] | None, reason: str | None) -> str:
        return event({"id": rid, "object": obj, "created": now(), "model": model,
                      "choices": [{"index": index, **part, "logprobs": lps, "finish_reason": reason}]})

    try:
        if chat:
            for i in range(n):
                yield frame(i, {"delta": {"role": "assistant", "content": ""}}, None, None)
        async for chunk in chunks:
            for d in chunk:
                if d.finish_reason == "error":
                    yield event(error_body(f"generation failed: {d.error}; retry", "server_error"))
                    return
                completion += len(d.token_ids)
                if d.index == 0 and d.cached_tokens is not None:
                    cached = d.cached_tokens
                lps = logprobs_body(d.logprobs, chat)
                if not chat:
                    yield frame(d.index, {"text": d.text}, lps, d.finish_reason)
                    continue
                parts, reason = chat_parts(parsers[d.index], d)
                # One chunk per part; finish reason and logprobs never dropped (an empty delta carries them).
                parts = parts or ([{}] if reason is not None or lps else [])
                for k, part in enumerate(parts):
                    yield frame(d.index, {"delta": part}, lps if k == 0 else None,
                                reason if k == len(parts) - 1 else None)
        if usage_prompt is not None:
            yield event({"id": rid, "object": obj, "created": now(), "model": model, "choices": [],
                         "usage": usage(usage_prompt, completion, cached)})
        yield "data: [DONE]\n\n"
    finally:
        chunks.cancel()  # a no-op once the replica finished; aborts its generation if the client left early
