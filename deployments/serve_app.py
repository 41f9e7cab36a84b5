"""Ray Serve app: an OpenAI-compatible HTTP ingress in front of the model deployment (`deployments.llm_server`).

The ingress parses, tokenizes and formats; the model replicas see token ids through a Serve handle, so the
request router can place each prompt where its prefix is cached (`deployments.prefix_router`). With
`colocate_ingress` each ingress replica runs its model replica in-process instead: one deployment, no handle hop.
"""
# No `from __future__ import annotations` here: FastAPI must see real types on the route signatures.

import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

import deployments.embeddings_api  # noqa: F401  (registers /v1/embeddings on `api` before Serve freezes it)
import deployments.lora_api  # noqa: F401  (registers the LoRA load/unload routes on `api` before Serve freezes it)
import deployments.responses_routes  # noqa: F401  (registers /v1/responses on `api` before Serve freezes it)
from actors.shard.host_memory import freeze_startup_heap
from actors.shard.niceness import set_nice
from cluster.config import GridServeConfig
from cluster.metrics import CONTENT_TYPE
from cluster.replica import ReplicaUnavailable
from cluster.tokenizer import load_tokenizer, prompt_ids
from deployments.chat import chat_prompt_ids
from deployments.http import APIError, api, parse_body
from deployments.llm_server import LLMServer
from deployments.lora_api import model_cards, selected, served_model
from deployments.mailbox import Mailbox
from deployments.metrics_board import board, merge
from deployments.openai_schema import ChatRequest, CompletionRequest, SamplingFields, new_id, now
from deployments.remote_stream import RETRY_AFTER_LOST_S, Refusal, open_chunks, replica_lost
from deployments.responses import ToolFactory, sse, whole_response
from deployments.tokenize_api import DetokenizeRequest, TokenizeRequest, detokenize, tokenize


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    """HTTP <-> the model deployment's handle, or (`llm` None: colocate_ingress) this actor's own model replica."""

    def __init__(self, llm: DeploymentHandle | None, args: dict[str, Any]) -> None:
        self.cfg = GridServeConfig.from_args(args)
        if self.cfg.serve_nice is not None:
            set_nice(self.cfg.serve_nice, "serve_nice")
        self.llm = llm
        # Colocated: bundle 0 of this actor's placement group is itself, the workers take the rest.
        # from @serve.deployment, which mypy does not apply to the class
        self.local = LLMServer.func_or_class(args, hand_back=False) if llm is None else None  # type: ignore[attr-defined]
        self.mailbox = Mailbox() if llm is not None else None  # model replicas on this host mail their deltas
        self.tokenizer = self.local.replica.tokenizer if self.local is not None else load_tokenizer(self.cfg.model)
        self.model_info: dict[str, Any] | None = None  # from a replica: max_model_len fitted to its KV cache
        self.board = board(serve.get_replica_context().app_name)
        freeze_startup_heap()

    async def _call(self, method: str, *args: Any) -> Any:
        """A unary call on some model replica; its Refusal, or its loss (503), becomes the HTTP error; an error
        its code raised is a bug and stays one (500, logged)."""
        try:
            if self.local is not None:
                value = await getattr(self.local, method)(*args)
            else:
                value = await getattr(self.llm, method).remote(*args)
        except Exception as exc:
            if not replica_lost(exc):
                raise
            raise ReplicaUnavailable(f"the model replica failed ({type(exc).__name__}); retry",
                                     RETRY_AFTER_LOST_S) from None
        if isinstance(value, Refusal):
            raise value.exception()
        return value

    async def _info(self) -> dict[str, Any]:
        """max_model_len and vocab_size as the replicas serve them (asked once)."""
        if self.model_info is None:
            self.model_info = await self._call("info")
        return self.model_info

    async def check_health(self) -> None:
        """Serve's periodic health check: the colocated model replica's own (LLMServer.check_health)."""
        if self.local is not None:
            await self.local.check_health()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The colocated replica's LLM load, for deployments.autoscaling.TokenLoadPolicy (none when split)."""
        return await self.local.record_autoscaling_stats() if self.local is not None else {}

    def _authorize(self, request: Request) -> None:
        """Enforce the optional API key."""
        if self.cfg.api_key and request.headers.get("authorization") != f"Bearer {self.cfg.api_key}":
            raise APIError(401, "missing or wrong API key; send `Authorization: Bearer <key>`",
                           "authentication_error")

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness for load balancers (no API key needed): 503 + Retry-After while a failed grid is rebuilt."""
        await self._call("health")
        return {"status": "ok"}

    @api.get("/status")
    async def status(self, request: Request) -> dict[str, Any]:
        """A replica's grid (stage x TP rank -> node, device, memory, busy %, all-reduce %) and flags."""
        self._authorize(request)
        return await self._call("status")

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus text of every model replica of the app merged: the answering one's as of now, the others'
        as of their last post."""
        self._authorize(request)
        fresh = await self._call("metrics_text")  # also posted to the board
        try:
            texts = await self.board.texts_now.remote()
        except RayActorError:  # the board went with the process that made it; replicas post to a new one
            self.board, texts = board(serve.get_replica_context().app_name), []
        return Response(merge(texts) if texts else fresh, media_type=CONTENT_TYPE)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """The served model and its LoRA adapters (each with `parent`: the model)."""
        self._authorize(request)
        max_len, created = (await self._info())["max_model_len"], now()
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": created,
                                            "owned_by": "gridserve", "root": self.cfg.model, "parent": None,
                                            "max_model_len": max_len}, *await model_cards(self, created, max_len)]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        """Text completion, streamed as SSE when `stream` is true."""
        self._authorize(request)
        body = await parse_body(request, CompletionRequest, served_model(self.cfg))
        return await self._respond(body, prompt_ids(self.tokenizer, body.prompt), chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        """Chat completion using the model's chat template; tools and structured outputs as OpenAI does them."""
        self._authorize(request)
        body = await parse_body(request, ChatRequest, served_model(self.cfg))
        ids = chat_prompt_ids(self.tokenizer, body.messages, body.tools)  # tools listed even with none
        return await self._respond(body, ids, chat=True, tools=body.tool_parsers())

    @api.post("/tokenize")
    async def tokenize_route(self, request: Request) -> dict[str, Any]:
        """vLLM's /tokenize: token ids of a prompt or of a rendered chat."""
        self._authorize(request)
        body = await parse_body(request, TokenizeRequest)
        return tokenize(self.tokenizer, body, (await self._info())["max_model_len"])

    @api.post("/detokenize")
    async def detokenize_route(self, request: Request) -> dict[str, Any]:
        """vLLM's /detokenize: the text of token ids."""
        self._authorize(request)
        body = await parse_body(request, DetokenizeRequest)
        return detokenize(self.tokenizer, body, (await self._info())["vocab_size"])  # asked once, not per request

    async def _respond(self, body: SamplingFields, ids: list[int], chat: bool, tools: ToolFactory = None) -> Any:
        """Run the request's n choices; answer as one body or as an SSE stream."""
        start, params = time.perf_counter(), selected(self.cfg, body.model, body.params())
        chunks = await open_chunks(self.local, self.llm, ids, params, self.cfg.migration_timeout_s,
                                   self.mailbox)  # a refusal raises here: 4xx / 503
        rid = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            usage_of = len(ids) if body.stream_options is not None and body.stream_options.include_usage else None
            return StreamingResponse(sse(chunks, body.n, rid, body.model, chat, tools, usage_of),
                                     media_type="text/event-stream")
        result, error = await whole_response(chunks, body.n, rid, body.model, chat, len(ids), tools)
        if error is not None:
            raise APIError(503, f"generation failed: {error}; retry", "server_error",
                           headers={"Retry-After": str(RETRY_AFTER_LOST_S)})
        # Model time (routing + queue + steps + detokenize) lets clients split latency into model vs Serve/HTTP.
        return JSONResponse(result, headers={"x-gridserve-engine-ms": f"{1000 * (time.perf_counter() - start):.3f}"})


def build_app(args: dict[str, Any]) -> Application:
    """Serve app builder (`import_path: deployments.serve_app:build_app`): validates args, sizes the replica group."""
    from deployments.make_model import ensure_default_model

    return make_app(GridServeConfig.from_args(ensure_default_model(dict(args))))


def make_app(cfg: GridServeConfig, **deployment_options: Any) -> Application:
    """The ingress over the model deployment (`deployment_options` apply to the latter; with colocate_ingress to the
    one deployment), one placement group per model replica, laid out by `cluster.placement` (bundle 0 for the
    replica actor, then one bundle per stage: each TP group on one node)."""
    from cluster.placement import HEAD_NODE, serve_group

    # Serve's default of 5 ongoing requests would hold requests in the handle, outside our batch. Let more reach
    # the replica than its engine runs or queues, so the excess gets our prompt 503 + Retry-After instead of
    # waiting in an unbounded queue.
    options = {"max_ongoing_requests": 2 * (cfg.max_num_seqs + cfg.max_waiting_requests), **deployment_options}
    args = cfg.model_dump(exclude_unset=True)  # what was set: each replica derives the rest (max_model_len) again
    group = serve_group(cfg)
    if cfg.colocate_ingress:
        # from @serve.deployment, which mypy does not apply to the class
        return OpenAIIngress.options(**group, **options).bind(None, args)  # type: ignore[attr-defined]
    if cfg.prefix_routing:
        from deployments.prefix_router import router_config

        options.setdefault("request_router_config", router_config(cfg.prefix_routing_imbalance, cfg.block_size))
    # from @serve.deployment, which mypy does not apply to the class
    llm = LLMServer.options(**group, **options).bind(args)  # type: ignore[attr-defined]
    scaling = options.get("autoscaling_config")
    most = (scaling.get("max_replicas") if isinstance(scaling, dict) else getattr(scaling, "max_replicas", None)) \
        or options.get("num_replicas") or 1
    actor: dict[str, Any] = {"num_cpus": cfg.ingress_cpus}
    if cfg.ingress_on_head:
        actor["resources"] = HEAD_NODE
    # from @serve.deployment, which mypy does not apply to the class
    return OpenAIIngress.options(ray_actor_options=actor,  # type: ignore[attr-defined]
                                 max_ongoing_requests=options["max_ongoing_requests"] * most).bind(llm, args)

