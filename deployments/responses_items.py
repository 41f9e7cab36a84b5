"""Input items of the Responses API (messages, function calls, their outputs) and the chat turns they become."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from deployments.openai_extras import ChatMessage, FunctionCall, ToolCall

ITEM_TYPES = ("message", "function_call", "function_call_output")
TEXT_PARTS = ("input_text", "output_text", "refusal")


def _part_text(parts: str | list[Part]) -> str:
    """A content string, or text parts joined by newlines."""
    return parts if isinstance(parts, str) else "\n".join(p.read() for p in parts)


class Part(BaseModel):
    """One text part of an input item (other part types are refused by name before parsing)."""

    model_config = ConfigDict(extra="allow")  # output_text parts sent back carry annotations and logprobs

    type: str = Field(description="input_text, output_text or refusal; images, files and audio are refused.")
    text: str | None = None
    refusal: str | None = None

    def read(self) -> str:
        """The part's text."""
        return self.text if self.text is not None else self.refusal or ""


def unreadable_part(item: dict[str, Any]) -> tuple[int, str] | None:
    """(index, type) of the first content part of a raw input item that is not text, if any."""
    parts = item.get("content", item.get("output"))
    for j, part in enumerate(parts if isinstance(parts, list) else []):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            return j, str(kind)
    return None


class MessageItem(BaseModel):
    """A message turn (OpenAI's easy form without `type`, or a full message item)."""

    model_config = ConfigDict(extra="ignore")  # items sent back carry output-only fields (status, caller, ...)

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]


class FunctionCallItem(BaseModel):
    """A function call the model made in an earlier turn."""

    model_config = ConfigDict(extra="ignore")  # items sent back carry output-only fields (status, caller, ...)

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(description="JSON-encoded arguments.")


class FunctionCallOutputItem(BaseModel):
    """The caller's result of a function call."""

    model_config = ConfigDict(extra="ignore")  # items sent back carry output-only fields (status, caller, ...)

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Part]


def item_type(value: Any) -> str | None:
    """An input item's tag (a message may leave `type` out)."""
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")], Discriminator(item_type)]


def chat_turns(items: list[MessageItem | FunctionCallItem | FunctionCallOutputItem]) -> list[ChatMessage]:
    """Input items as chat turns: function calls join the assistant turn before them, outputs become tool turns."""
    out: list[ChatMessage] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append(ChatMessage(role=item.role, content=_part_text(item.content)))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            if out and out[-1].role == "assistant":
                out[-1].tool_calls = (out[-1].tool_calls or []) + [call]
            else:
                out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        else:
            out.append(ChatMessage(role="tool", content=_part_text(item.output), tool_call_id=item.call_id))
    return out
