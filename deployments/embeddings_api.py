"""OpenAI's embeddings endpoint on the ingress: `POST /v1/embeddings`.

Inputs are tokenized here and pooled by a model replica through the same grid and steps as generation: each
input's last-token final hidden state (last-token pooling, as decoder LMs embed), L2-normalized as OpenAI's
vectors are. Registered on the ingress's FastAPI app by importing this module (as `deployments.serve_app` does).
"""
# No `from __future__ import annotations` here: FastAPI must see real types on the route signatures.

import base64
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from cluster.request import RequestError
from deployments.http import Ingress, api, parse_body
from deployments.openai_schema import check_served

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings body: text, texts, token ids or lists of token ids."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Served model name.")
    input: str | list[str] | list[int] | list[list[int]] = Field(description="What to embed.")
    encoding_format: Literal["float", "base64"] = Field("float", description="float lists or base64 float32.")
    dimensions: int | None = Field(None, ge=1, description="Only the model's own hidden size is offered.")
    user: str | None = Field(None, description="End-user id (accepted, not used).")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "EmbeddingRequest":
        """The served model (404 otherwise), and at least one, at most MAX_INPUTS, non-empty inputs."""
        check_served(self.model, info)
        items = self.input
        if isinstance(items, list) and (not items or any(isinstance(v, list | str) and not v for v in items)):
            raise RequestError("`input` must hold at least one non-empty text or token list", "input")
        if isinstance(items, list) and len(items) > MAX_INPUTS:
            raise RequestError(f"`input` holds {len(items)} items; send at most {MAX_INPUTS} per request", "input")
        return self

    def token_lists(self, tokenizer: Any) -> list[list[int]]:
        """Every input as token ids (texts tokenized as the model's tokenizer does, special tokens included)."""
        raw = self.input
        items: list[str | list[int]]
        if isinstance(raw, str):
            items = [raw]
        elif raw and isinstance(raw[0], int):  # one token list (pydantic keeps the list kinds apart)
            items = [[v for v in raw if isinstance(v, int)]]
        else:
            items = [v for v in raw if isinstance(v, str | list)]
        if any(isinstance(item, str) for item in items) and tokenizer is None:
            raise RequestError("this model has no tokenizer: send token ids", "input")
        return [list(tokenizer.encode(item)) if isinstance(item, str) else list(item) for item in items]


def encode(vector: np.ndarray, how: str) -> list[float] | str:
    """A unit vector as OpenAI sends it: a float list, or base64 of little-endian float32."""
    if how == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]


@api.post("/v1/embeddings")
async def embeddings(request: Request, ingress: Ingress) -> JSONResponse:
    """Embed every input on one model replica; the answer lists them in input order."""
    ingress._authorize(request)
    body = await parse_body(request, EmbeddingRequest, ingress.cfg.model_name)
    width = (await ingress._info())["hidden_size"]
    if body.dimensions is not None and body.dimensions != width:
        raise RequestError(f"dimensions={body.dimensions} is not offered: this model's embeddings have {width} "
                           "dimensions and it was not trained to shorten them; omit `dimensions`", "dimensions")
    prompts = body.token_lists(ingress.tokenizer)
    vectors = await ingress._call("embed", prompts)  # a refusal raises here: 400 / 503
    data = []
    for i, vec in enumerate(vectors):
        unit = np.asarray(vec, dtype=np.float32)
        unit = unit / max(float(np.linalg.norm(unit)), 1e-12)
        data.append({"object": "embedding", "index": i, "embedding": encode(unit, body.encoding_format)})
    tokens = sum(len(p) for p in prompts)
    return JSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
