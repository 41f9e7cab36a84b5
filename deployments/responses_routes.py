"""OpenAI's Responses API on the ingress: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

Routes on the ingress's FastAPI app that reach the ingress replica through a dependency (importing this module
registers them; `deployments.serve_app` does so before Serve freezes the app). The body is checked by
`ResponsesRequest`, rendered by the chat template like a chat request, run on a model replica, and answered as a
response object or its typed events. Stored responses live in `deployments.response_store`.
"""
# No `from __future__ import annotations` here: FastAPI must see real types on the route signatures.

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cluster.request import RequestError
from deployments.chat import chat_prompt_ids
from deployments.http import APIError, Ingress, api, parse_body
from deployments.lora_api import selected, served_model
from deployments.openai_extras import ChatMessage
from deployments.remote_stream import RETRY_AFTER_LOST_S, ChunkStream, open_chunks
from deployments.response_events import TERMINAL, EventWriter, OutputBuilder, item_id, response_body
from deployments.response_store import MAX_AGE_S, StoreClient
from deployments.responses_api import ResponsesRequest


def store_of(ingress: Any) -> StoreClient:
    """The app's response store client, kept on the ingress replica (made on first use)."""
    if getattr(ingress, "response_store", None) is None:
        ingress.response_store = StoreClient(serve.get_replica_context().app_name)
    return ingress.response_store


@api.post("/v1/responses")
async def create_response(request: Request, ingress: Ingress) -> Any:
    """Generate a response: one body, or typed events when `stream` is true; stored unless `store` is false."""
    ingress._authorize(request)
    body = await parse_body(request, ResponsesRequest, served_model(ingress.cfg))
    turns = await history(ingress, body.previous_response_id) + body.turns()
    ids = chat_prompt_ids(ingress.tokenizer, body.messages(turns), body.chat_tools())
    params = selected(ingress.cfg, body.model, body.params())  # the LoRA adapter `model` names, if it names one
    chunks = await open_chunks(ingress.local, ingress.llm, ids, params, ingress.cfg.migration_timeout_s,
                               ingress.mailbox)  # a refusal raises here: 400 / 503
    run = ResponseRun(body, len(ids), turns, store_of(ingress))
    if body.stream:
        return StreamingResponse(run.events(chunks), media_type="text/event-stream")
    result = await run.whole(chunks)
    if result["status"] == "failed":
        raise APIError(503, result["error"]["message"], "server_error",
                       headers={"Retry-After": str(RETRY_AFTER_LOST_S)})
    return JSONResponse(result)


@api.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str, ingress: Ingress) -> Any:
    """A stored response, as it was answered."""
    ingress._authorize(request)
    return json.loads(await stored(ingress, response_id, "response_id", 404))["response"]


@api.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str, ingress: Ingress) -> Any:
    """Forget a stored response."""
    ingress._authorize(request)
    if not await store_of(ingress).call("delete", response_id):
        raise not_stored(response_id, "response_id", 404)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


async def history(ingress: Any, previous: str | None) -> list[ChatMessage]:
    """The conversation stored under `previous` (empty without one)."""
    if previous is None:
        return []
    record = json.loads(await stored(ingress, previous, "previous_response_id", 400))
    return [ChatMessage.model_validate(m) for m in record["messages"]]


async def stored(ingress: Any, response_id: str, param: str, status: int) -> bytes:
    """The stored record of `response_id`, or a 4xx naming `param`."""
    record = await store_of(ingress).call("get", response_id)
    if record is None:
        raise not_stored(response_id, param, status)
    return record


def not_stored(response_id: str, param: str, status: int) -> RequestError:
    """The error for a response id the store does not hold."""
    return RequestError(f"no stored response {response_id!r}: it was created with store false, was evicted (the "
                        f"store keeps the newest responses up to its size limits, each for {MAX_AGE_S / 3600:g} h), "
                        "or the store was lost with a Ray restart; send the whole conversation as input instead",
                        param, status, "previous_response_not_found" if status == 400 else "not_found")


class ResponseRun:
    """One response being generated: its output builder, body and (with store) the record kept for later turns."""

    def __init__(self, body: ResponsesRequest, input_tokens: int, turns: list[ChatMessage],
                 store: StoreClient) -> None:
        self.body, self.input_tokens, self.turns, self.store = body, input_tokens, turns, store
        self.rid, self.created = item_id("resp"), time.time()
        parsers = body.tool_parsers()
        self.builder = OutputBuilder(parsers() if parsers is not None else None)

    async def whole(self, chunks: ChunkStream) -> dict[str, Any]:
        """Run to the end; the finished (stored) response."""
        try:
            async for chunk in chunks:
                for delta in chunk:
                    self.builder.feed(delta)
        finally:
            chunks.cancel()  # a no-op once the replica finished; aborts its generation if the client left early
        return await self._finish()

    async def events(self, chunks: ChunkStream) -> AsyncIterator[str]:
        """The typed events, from response.created to response.completed (incomplete, failed)."""
        writer = EventWriter()
        start = response_body(self.rid, self.created, self.body, None, self.input_tokens)
        try:
            yield writer.frame({"type": "response.created", "response": start})
            yield writer.frame({"type": "response.in_progress", "response": start})
            async for chunk in chunks:
                for delta in chunk:
                    for event in self.builder.feed(delta):
                        yield writer.frame(event)
            result = await self._finish()
            yield writer.frame({"type": TERMINAL[result["status"]], "response": result})
        finally:
            chunks.cancel()

    async def _finish(self) -> dict[str, Any]:
        """The finished response, stored (with the conversation so far) when asked and not failed."""
        result = response_body(self.rid, self.created, self.body, self.builder, self.input_tokens)
        if self.body.store and result["status"] != "failed":
            turns = [m.model_dump(exclude_none=True) for m in self.turns] + [self.builder.assistant_turn()]
            await self.store.call("put", self.rid, json.dumps({"response": result, "messages": turns}).encode())
        return result
