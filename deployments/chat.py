"""Chat messages as the model's chat template expects them: parts joined, developer as system, tool turns."""
from __future__ import annotations

import json
from typing import Any

from cluster.request import RequestError
from deployments.openai_extras import ChatMessage, Tool


def _arguments(raw: str) -> Any:
    """Tool-call arguments as templates render them: the decoded object when the string is JSON."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain dicts for `apply_chat_template` (Hugging Face's message format)."""
    out = []
    for msg in messages:
        item: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role, "content": msg.text()}
        if msg.name is not None:
            item["name"] = msg.name
        if msg.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in msg.tool_calls]
        if msg.role == "tool":
            item["tool_call_id"] = msg.tool_call_id
        out.append(item)
    return out


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage], tools: list[Tool] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation (tools passed to templates that describe them)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; use /v1/completions", "messages")
    kwargs: dict[str, Any] = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
    ids = tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=add_generation_prompt,
                                        tokenize=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
