"""vLLM's /tokenize and /detokenize: bodies and answers."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.request import RequestError
from deployments.chat import chat_prompt_ids
from deployments.openai_extras import ChatMessage, Tool


class TokenizeRequest(BaseModel):
    """A prompt, or chat messages rendered by the chat template (exactly one)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Served model name (optional).")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    add_special_tokens: bool = Field(True, description="Prompt only: add BOS etc. as the tokenizer does.")
    add_generation_prompt: bool = Field(True, description="Messages only: end with the assistant header.")
    return_token_strs: bool = Field(False, description="Also return each token's text.")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        """Exactly one of prompt and messages."""
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class DetokenizeRequest(BaseModel):
    """Token ids to turn back into text."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Served model name (optional).")
    tokens: list[int] = Field(description="Token ids.")


def tokenize(tokenizer: Any, body: TokenizeRequest, max_model_len: int) -> dict[str, Any]:
    """{count, max_model_len, tokens[, token_strs]} as vLLM answers."""
    if tokenizer is None:
        raise RequestError("this model has no tokenizer", "prompt")
    if body.messages is not None:
        ids = chat_prompt_ids(tokenizer, body.messages, body.tools, body.add_generation_prompt)
    else:
        ids = list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
    out: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return out


def detokenize(tokenizer: Any, body: DetokenizeRequest, vocab_size: int) -> dict[str, str]:
    """{prompt}: the text of the ids."""
    if tokenizer is None:
        raise RequestError("this model has no tokenizer", "tokens")
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids must lie in [0, {vocab_size}); got {bad[:5]}", "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}
