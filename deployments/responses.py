"""OpenAI response bodies and SSE chunks built from the engine's text streams (n choices, logprobs)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from cluster.detokenize import TextStream
from deployments.openai_schema import error_body, now


def format_logprobs(stream: TextStream, tokenizer: Any, chat: bool, start: int = 0) -> dict | None:
    """OpenAI's logprobs object for the tokens of `stream` from index `start` on (None if not asked)."""
    items = stream.logprobs[start:]
    if not items:
        return None
    text = [tokenizer.decode([tok]) for tok, _ in items]
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": tokenizer.decode([i]), "logprob": v,
                                               "bytes": list(tokenizer.decode([i]).encode())} for i, v in top]}
                            for t, (_, (lp, top)) in zip(text, items)]}
    return {"tokens": text, "token_logprobs": [lp for _, (lp, _) in items],
            "top_logprobs": [{tokenizer.decode([i]): v for i, v in top} for _, (_, top) in items],
            "text_offset": []}


def choice_body(index: int, text: str, reason: str | None, logprobs: dict | None, chat: bool) -> dict:
    """One choice of a whole (non-streamed) response."""
    body: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
    body.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return body


async def collect(streams: list[TextStream], tokenizer: Any, rid: str, model: str, chat: bool,
                  prompt_len: int) -> tuple[dict | None, str | None]:
    """Run every choice to the end; returns (response body, error message of a failed choice)."""
    async def one(stream: TextStream) -> tuple[str, str | None]:
        text, reason = "", None
        async for delta, reason in stream:
            text += delta
        return text, reason

    done = await asyncio.gather(*(one(s) for s in streams))
    failed = next((s.error for s in streams if s.error), None)
    if failed:
        return None, failed
    completion = sum(s.num_tokens for s in streams)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(), "model": model,
            "choices": [choice_body(i, text, reason, format_logprobs(s, tokenizer, chat), chat)
                        for i, ((text, reason), s) in enumerate(zip(done, streams))],
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion,
                      "total_tokens": prompt_len + completion}}, None


def event(payload: dict) -> str:
    """One SSE frame."""
    return f"data: {json.dumps(payload)}\n\n"


async def sse(streams: list[TextStream], tokenizer: Any, rid: str, model: str, chat: bool,
              usage_prompt_len: int | None = None) -> AsyncIterator[str]:
    """Server-sent events for n choices interleaved as they produce text, then (with `usage_prompt_len`, the
    prompt's token count: stream_options.include_usage) a usage chunk, then `data: [DONE]`."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: TextStream) -> None:
        seen = 0
        async for delta, reason in stream:
            lps = format_logprobs(stream, tokenizer, chat, seen)
            seen = len(stream.logprobs)
            queue.put_nowait((index, delta, reason, lps, stream.error))
        queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        if chat:
            for i in range(len(streams)):
                yield event({"id": rid, "object": obj, "created": now(), "model": model,
                             "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})
        remaining = len(streams)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            index, delta, reason, lps, error = item
            if reason == "error":
                yield event(error_body(f"generation failed: {error}; retry", "server_error"))
                return
            part = {"delta": {"content": delta} if delta else {}} if chat else {"text": delta}
            yield event({"id": rid, "object": obj, "created": now(), "model": model,
                         "choices": [{"index": index, **part, "logprobs": lps, "finish_reason": reason}]})
        if usage_prompt_len is not None:
            completion = sum(s.num_tokens for s in streams)
            yield event({"id": rid, "object": obj, "created": now(), "model": model, "choices": [],
                         "usage": {"prompt_tokens": usage_prompt_len, "completion_tokens": completion,
                                   "total_tokens": usage_prompt_len + completion}})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()  # client went away: closing the streams aborts their requests
        await asyncio.gather(*tasks, return_exceptions=True)
