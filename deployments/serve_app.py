"""Ray Serve app: an OpenAI-compatible HTTP face over one `cluster.replica.Replica` per Serve replica."""
# No `from __future__ import annotations` here: FastAPI must see real types on the route signatures.

import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.util import get_current_placement_group

from cluster.config import GridServeConfig
from cluster.metrics import CONTENT_TYPE
from cluster.replica import Replica, ReplicaUnavailable
from deployments.http import APIError, api, parse_body
from deployments.chat import chat_prompt_ids
from deployments.openai_schema import ChatRequest, CompletionRequest, SamplingFields, new_id, now
from deployments.structured import grammar_of
from deployments.tokenize_api import DetokenizeRequest, TokenizeRequest, detokenize, tokenize
from deployments.tools import ToolOutput, tool_grammar, tool_mode
from deployments.ray_metrics import RayMetrics
from deployments.responses import collect_choices, sse

log = logging.getLogger("gridserve.serve")


@serve.deployment
@serve.ingress(api)
class LLMServer:
    """HTTP <-> Replica. The workers are actors this replica actor owns: Ray ends them with it."""

    def __init__(self, args: dict[str, Any]) -> None:
        cfg = GridServeConfig.from_args(args)
        tag = serve.get_replica_context().replica_tag
        pg = get_current_placement_group()  # Serve's group: bundle 0 is this actor, 1.. the workers
        self.replica = Replica(cfg, tag, pg, bundle_offset=1 if pg is not None else 0)
        self.cfg = self.replica.cfg  # max_model_len fitted to the grid's KV cache
        self.ray_metrics = RayMetrics()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Load as LLM work, for deployments.autoscaling.TokenLoadPolicy."""
        return self.replica.load()

    async def check_health(self) -> None:
        """Serve's periodic health check: probe the grid (a dead worker starts a rebuild), refresh Ray's gauges;
        a failed rebuild fails the check and Serve replaces this replica."""
        if (failure := self.replica.failure()) is not None:
            raise RuntimeError(failure)
        try:
            snapshot = await self.replica.snapshot()
        except ReplicaUnavailable:
            return  # being rebuilt: healthy unless the rebuild fails
        try:
            self.ray_metrics.update(snapshot)
        except Exception:  # metrics must never fail the health check
            log.exception("could not export Ray metrics")

    def _authorize(self, request: Request) -> None:
        """Enforce the optional API key."""
        if self.cfg.api_key and request.headers.get("authorization") != f"Bearer {self.cfg.api_key}":
            raise APIError(401, "missing or wrong API key; send `Authorization: Bearer <key>`",
                           "authentication_error")

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness for load balancers (no API key needed)."""
        self.replica.check_alive()  # a failed grid: 503 + Retry-After while it is rebuilt
        return {"status": "ok"}

    @api.get("/status")
    async def status(self, request: Request) -> dict[str, Any]:
        """The replica's grid (stage x TP rank -> node, device, memory, busy %, all-reduce %) and flags."""
        self._authorize(request)
        return await self.replica.snapshot()

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus text of the replica that answers (Ray's own exporter also carries Serve's metrics)."""
        self._authorize(request)
        return Response(await self.replica.metrics_text(), media_type=CONTENT_TYPE)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """The one served model."""
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": now(),
                                            "owned_by": "gridserve", "max_model_len": self.cfg.max_model_len}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        """Text completion, streamed as SSE when `stream` is true."""
        self._authorize(request)
        body = await parse_body(request, CompletionRequest)
        return await self._respond(body, self.replica.tokenize(body.prompt), chat=False, grammar=grammar_of(body))

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        """Chat completion using the model's chat template; tools and structured outputs as OpenAI does them."""
        self._authorize(request)
        body = await parse_body(request, ChatRequest)
        if self.replica.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template; use /v1/completions with "
                           "token ids", param="messages")
        mode, name = tool_mode(body.tools, body.tool_choice)
        grammar = grammar_of(body, tool_grammar(body.tools, mode, name, body.parallel_tool_calls))
        ids = chat_prompt_ids(self.replica.tokenizer, body.messages, body.tools)  # tools listed even with none
        tools = None if mode == "none" else (lambda: ToolOutput(mode, name))
        return await self._respond(body, ids, chat=True, grammar=grammar, tools=tools)

    @api.post("/tokenize")
    async def tokenize_route(self, request: Request) -> dict[str, Any]:
        """vLLM's /tokenize: token ids of a prompt or of a rendered chat."""
        self._authorize(request)
        return tokenize(self.replica.tokenizer, await parse_body(request, TokenizeRequest), self.cfg.max_model_len)

    @api.post("/detokenize")
    async def detokenize_route(self, request: Request) -> dict[str, Any]:
        """vLLM's /detokenize: the text of token ids."""
        self._authorize(request)
        return detokenize(self.replica.tokenizer, await parse_body(request, DetokenizeRequest),
                          self.replica.spec.vocab_size)

    async def _respond(self, body: SamplingFields, ids: list[int], chat: bool, grammar: Any = None,
                       tools: Any = None) -> Any:
        """Run the request's n choices (under `grammar` if set); answer as one body or as an SSE stream."""
        if body.model != self.cfg.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           param="model")
        streams = self.replica.generate(ids, body, body.n, grammar)
        rid, tokenizer = new_id("chatcmpl" if chat else "cmpl"), self.replica.tokenizer
        if body.stream:
            usage_of = len(ids) if body.stream_options is not None and body.stream_options.include_usage else None
            return StreamingResponse(sse(streams, tokenizer, rid, body.model, chat, tools, usage_of),
                                     media_type="text/event-stream")
        start = time.perf_counter()
        result, error = await collect_choices(streams, tokenizer, rid, body.model, chat, len(ids), tools)
        if error is not None:
            raise APIError(503, f"generation failed: {error}; retry", "server_error")
        # Engine time (queue + steps + detokenize) lets clients split latency into engine vs Serve/HTTP.
        return JSONResponse(result, headers={"x-gridserve-engine-ms": f"{1000 * (time.perf_counter() - start):.3f}"})


def build_app(args: dict[str, Any]) -> Application:
    """Serve app builder (`import_path: deployments.serve_app:build_app`): validates args, sizes the replica group."""
    from deployments.make_model import ensure_default_model

    return make_app(GridServeConfig.from_args(ensure_default_model(dict(args))))


def make_app(cfg: GridServeConfig, **deployment_options: Any) -> Application:
    """The deployment with one placement group per replica, laid out by `cluster.placement` (bundle 0 for the
    replica actor, then one bundle per stage: each TP group on one node)."""
    import ray

    from cluster.placement import Layout, alive_nodes, plan_layout, serve_bundles, worker_resource

    totals = ray.cluster_resources() if ray.is_initialized() else {}
    resource = worker_resource(cfg, totals)
    layout = plan_layout(cfg, alive_nodes(resource), resource) if totals else Layout.of(cfg, resource)
    # Serve's default of 5 ongoing requests would hold requests at the proxy, outside our batch. Let more reach
    # the replica than its engine runs or queues, so the excess gets our prompt 503 + Retry-After instead of
    # waiting in an unbounded proxy queue.
    options = {"max_ongoing_requests": 2 * (cfg.max_num_seqs + cfg.max_waiting_requests), **deployment_options}
    return LLMServer.options(placement_group_bundles=serve_bundles(cfg, layout), placement_group_strategy="PACK",
                             ray_actor_options={"num_cpus": cfg.replica_cpus}, **options).bind(
        cfg.model_dump(exclude_unset=True))  # what was set: each replica derives the rest (e.g. max_model_len) again
