"""OpenAI response bodies and SSE chunks built from the engine's text streams (n choices, logprobs)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from cluster.detokenize import TextStream
from cluster.generate import collect
from deployments.openai_schema import error_body, now
from deployments.tools import ToolOutput, merge

ToolFactory = Callable[[], ToolOutput] | None  # a fresh tool-call parser per choice (chat with tools)


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


def choice_body(index: int, text: str, reason: str | None, logprobs: dict | None, chat: bool,
                tools: ToolFactory = None) -> dict:
    """One choice of a whole (non-streamed) response; with tools, calls in the text become `tool_calls`."""
    message = {"role": "assistant", "content": text}
    if chat and tools is not None:
        parser = tools()
        deltas = parser.feed(text)
        tail, reason = parser.finish(reason)
        message = merge(deltas + tail)
    body: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
    body.update({"message": message} if chat else {"text": text})
    return body


def usage(prompt_len: int, streams: list[TextStream]) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache served (first choice's admission)."""
    completion = sum(s.num_tokens for s in streams)
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
            "prompt_tokens_details": {"cached_tokens": streams[0].cached_tokens if streams else 0}}


async def collect_choices(streams: list[TextStream], tokenizer: Any, rid: str, model: str, chat: bool,
                          prompt_len: int, tools: ToolFactory = None) -> tuple[dict | None, str | None]:
    """Run every choice to the end; returns (response body, error message of a failed choice)."""
    done = await asyncio.gather(*(collect(s) for s in streams))
    failed = next((s.error for s in streams if s.error), None)
    if failed:
        return None, failed
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(), "model": model,
            "choices": [choice_body(i, text, reason, format_logprobs(s, tokenizer, chat), chat, tools)
                        for i, ((text, reason), s) in enumerate(zip(done, streams))],
            "usage": usage(prompt_len, streams)}, None


def event(payload: dict) -> str:
    """One SSE frame."""
    return f"data: {json.dumps(payload)}\n\n"


def chat_deltas(parser: ToolOutput | None, text: str, reason: str | None) -> tuple[list[dict], str | None]:
    """A choice's chat deltas for new text (tool calls parsed out when tools are on) and its finish reason."""
    if parser is None:
        return ([{"content": text}] if text else []), reason
    deltas = parser.feed(text)
    if reason is None or reason == "error":
        return deltas, reason
    tail, reason = parser.finish(reason)
    return deltas + tail, reason


async def sse(streams: list[TextStream], tokenizer: Any, rid: str, model: str, chat: bool,
              tools: ToolFactory = None, usage_prompt: int | None = None) -> AsyncIterator[str]:
    """Server-sent events for n choices interleaved as they produce text, then (if `usage_prompt` is given) a
    usage chunk without choices, then `data: [DONE]`."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: TextStream) -> None:
        seen, parser = 0, tools() if chat and tools is not None else None
        async for delta, reason in stream:
            lps = format_logprobs(stream, tokenizer, chat, seen)
            seen = len(stream.logprobs)
            parts, reason = chat_deltas(parser, delta, reason) if chat else ([{"text": delta}], reason)
            queue.put_nowait((index, parts, reason, lps, stream.error))
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
            index, parts, reason, lps, error = item
            if reason == "error":
                yield event(error_body(f"generation failed: {error}; retry", "server_error"))
                return
            if chat:  # one chunk per delta; finish reason and logprobs never dropped (an empty delta carries them)
                parts = [{"delta": d} for d in parts or ([{}] if reason is not None or lps else [])]
            for k, part in enumerate(parts):
                last = k == len(parts) - 1
                yield event({"id": rid, "object": obj, "created": now(), "model": model,
                             "choices": [{"index": index, **part, "logprobs": lps if k == 0 else None,
                                          "finish_reason": reason if last else None}]})
        if usage_prompt is not None:
            yield event({"id": rid, "object": obj, "created": now(), "model": model, "choices": [],
                         "usage": usage(usage_prompt, streams)})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()  # client went away: closing the streams aborts their requests
        await asyncio.gather(*tasks, return_exceptions=True)
