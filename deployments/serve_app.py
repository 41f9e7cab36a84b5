"""Ray Serve app: an OpenAI-compatible HTTP endpoint; each replica owns one TP x PP grid."""
# No `from __future__ import annotations` here: FastAPI must see real types on the route signatures.

import asyncio
import logging
import os
import time
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
import ray
from ray import serve
from ray.serve import Application
from ray.util import get_current_placement_group

from cluster.config import GridServeConfig
from cluster.detokenize import TextStream
from cluster.engine import AsyncEngine
from cluster.metrics import grid_flags, prometheus_text
from cluster.tokenizer import load_tokenizer
from deployments.openai_schema import ChatRequest, CompletionRequest, SamplingFields, error_body, new_id, now
from deployments.ray_metrics import RayMetrics
from deployments.responses import collect, sse

log = logging.getLogger("gridserve.serve")
T = TypeVar("T", bound=BaseModel)
MAX_BODY_BYTES = 4 * 2**20
api = FastAPI(title="gridserve", description="OpenAI-compatible API over a TP x PP grid of Ray actors")


class APIError(Exception):
    """An error answered as OpenAI's error envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    """Render APIError."""
    return JSONResponse(error_body(exc.message, exc.type, exc.param), exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Bad JSON or bad fields: 400 naming the field, like OpenAI."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                        for e in exc.errors()[:5])
    return JSONResponse(error_body(message, param=param), 400)


async def parse_body(request: Request, schema: type[T]) -> T:
    """Read and validate a JSON body; malformed JSON and bad fields become HTTP 400 naming the field."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise APIError(400, f"request body is not valid JSON: {errors[0]['msg']}") from None
        first = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
        raise APIError(400, message, param=first) from None


# Helpers above this line: serve.ingress snapshots the module globals the routes can see.
@serve.deployment
@serve.ingress(api)
class LLMServer:
    """One replica: tokenizer, async engine and the grid of worker actors in the replica's placement group."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.cfg = GridServeConfig(**args)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.spec = self.cfg.spec()
        self.vocab_size = self.spec.vocab_size
        self.pg = get_current_placement_group()
        self.rebuild: asyncio.Task | None = None
        self.rebuilds = 0
        self.grid = self._new_grid()
        self.engine = AsyncEngine.from_config(self.grid, self.cfg, self.spec.eos_token_ids)
        self.ray_metrics = RayMetrics()

    def _new_grid(self) -> Any:
        """Workers in this replica's placement group: bundle 0 holds the replica actor, bundles 1.. the workers."""
        from cluster.grid import WorkerGrid

        return WorkerGrid(self.cfg, placement_group=self.pg, bundle_offset=1 if self.pg is not None else 0)

    def _heal(self) -> None:
        """After a grid failure, start (once) replacing the grid inside the same placement group."""
        if self.engine.dead and (self.rebuild is None or self.rebuild.done()):
            self.rebuild = asyncio.get_running_loop().create_task(self._rebuild())

    async def _rebuild(self) -> None:
        """Kill the broken grid and start a fresh one; requests meanwhile get 503 + Retry-After."""
        log.warning("grid failed (%s); rebuilding it", self.engine.dead)
        await asyncio.to_thread(self.grid.shutdown)
        self.grid = await asyncio.to_thread(self._new_grid)
        self.engine = AsyncEngine.from_config(self.grid, self.cfg, self.spec.eos_token_ids)
        self.rebuilds += 1
        log.warning("grid rebuilt (%d so far)", self.rebuilds)

    def __del__(self) -> None:
        grid = getattr(self, "grid", None)
        if grid is not None:
            grid.shutdown()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Load as LLM work, for deployments.autoscaling.TokenLoadPolicy."""
        return {"pending_tokens": float(self.engine.pending_tokens()),
                "kv_cache_usage": float(self.engine.scheduler.blocks.usage),
                "running": float(self.engine.num_running), "waiting": float(self.engine.num_waiting)}

    async def check_health(self) -> None:
        """Serve's health check: a failed grid is rebuilt here; if rebuilding fails, Serve replaces the replica."""
        if self.rebuild is not None and self.rebuild.done() and self.rebuild.exception() is not None:
            raise RuntimeError(f"grid rebuild failed: {self.rebuild.exception()}")
        if not self.engine.dead:  # Serve calls this every health_check_period_s: probe the workers, refresh gauges
            status = await self._probe()
            if status is not None:
                try:
                    self.ray_metrics.update(status)
                except Exception:  # metrics must never fail the health check
                    log.exception("could not export Ray metrics")
        self._heal()

    def _authorize(self, request: Request) -> None:
        """Enforce the optional API key."""
        if self.cfg.api_key and request.headers.get("authorization") != f"Bearer {self.cfg.api_key}":
            raise APIError(401, "missing or wrong API key; send `Authorization: Bearer <key>`",
                           "authentication_error")

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness for load balancers (no API key needed)."""
        if self.engine.dead:
            self._heal()
            raise APIError(503, f"grid failed ({self.engine.dead}); rebuilding it", "server_error",
                           headers={"Retry-After": "5"})
        return {"status": "ok"}

    def _status(self) -> dict[str, Any]:
        """This replica's engine counters and its grid's per-worker place, memory and utilization."""
        e = self.engine
        engine = {"requests_running": e.num_running, "requests_waiting": e.num_waiting,
                  "kv_cache_usage": e.scheduler.blocks.usage, "kv_cache_blocks": e.scheduler.blocks.num_blocks,
                  "preemptions_total": e.scheduler.num_preemptions,
                  "prefix_cache_hit_tokens_total": e.scheduler.prefix_hit_tokens,
                  "prefix_cache_queried_tokens_total": e.scheduler.admitted_tokens,
                  "steps_total": e.stats.steps, "prompt_tokens_total": e.stats.prompt_tokens,
                  "generation_tokens_total": e.stats.generation_tokens, **e.stats.latency_p50()}
        workers = [] if e.dead else self.grid.worker_stats()
        return {"replica": serve.get_replica_context().replica_tag, "pid": os.getpid(), "tp": self.grid.tp,
                "pp": self.grid.pp, "rebuilds": self.rebuilds, "dead": e.dead, "engine": engine,
                "workers": workers, "flags": grid_flags(workers)}

    async def _probe(self) -> dict[str, Any] | None:
        """`_status` off the event loop; None if a worker is found dead (even while idle): the grid is then
        failed and rebuilt."""
        try:
            return await asyncio.to_thread(self._status)
        except ray.exceptions.RayError as exc:
            self.engine.fail(f"worker unreachable: {type(exc).__name__}")
            self._heal()
            return None

    async def _snapshot(self) -> dict[str, Any]:
        """`_probe` for HTTP routes: a dead worker answers 503 + Retry-After."""
        status = await self._probe()
        if status is None:
            raise APIError(503, "a worker of this replica's grid died; rebuilding it", "server_error",
                           headers={"Retry-After": "5"})
        return status

    @api.get("/status")
    async def status(self, request: Request) -> dict[str, Any]:
        """The replica's grid (stage x TP rank -> node, device, memory, busy %, all-reduce %) and flags."""
        self._authorize(request)
        return await self._snapshot()

    @api.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        """Prometheus text for the replica that answers (Ray's own exporter also carries Serve's metrics)."""
        self._authorize(request)
        st = await self._snapshot()
        return PlainTextResponse(prometheus_text(st["replica"], st["engine"], st["workers"]),
                                 media_type="text/plain; version=0.0.4")

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
        if isinstance(body.prompt, str):
            ids = self.tokenizer.encode(body.prompt)
        else:
            ids = list(body.prompt)
        return await self._respond(body, ids, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        """Chat completion using the tokenizer's chat template."""
        self._authorize(request)
        body = await parse_body(request, ChatRequest)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return await self._respond(body, list(ids), chat=True)

    def _check(self, body: SamplingFields, ids: list[int]) -> int:
        """Validate the request against this model; returns the effective max_tokens."""
        if body.model != self.cfg.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           param="model")
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise APIError(400, f"prompt token ids must lie in [0, {self.vocab_size})", param="prompt")
        room = self.cfg.max_model_len - len(ids)
        if room < 1:
            raise APIError(400, f"prompt has {len(ids)} tokens; max_model_len is {self.cfg.max_model_len}, which "
                           "leaves no room to generate; shorten the prompt", param="prompt")
        if body.max_tokens is not None and body.max_tokens > room:
            raise APIError(400, f"max_tokens={body.max_tokens} plus the prompt's {len(ids)} tokens exceeds "
                           f"max_model_len={self.cfg.max_model_len}; lower max_tokens to at most {room}",
                           param="max_tokens")
        if self.engine.dead:
            self._heal()
            raise APIError(503, f"this replica's grid failed ({self.engine.dead}) and is being rebuilt; retry",
                           "server_error", headers={"Retry-After": "5"})
        if self.engine.num_waiting >= self.cfg.max_waiting_requests:
            raise APIError(503, f"server overloaded: {self.engine.num_waiting} requests queued; retry shortly",
                           "server_error", headers={"Retry-After": "1"})
        return body.max_tokens or room

    async def _respond(self, body: SamplingFields, ids: list[int], chat: bool) -> Any:
        """Run the request's n choices; answer as one body or as an SSE stream."""
        max_tokens = self._check(body, ids)
        stops = body.stop_list()
        try:
            streams = [TextStream(self.engine.generate(ids, body.sampling(i), max_tokens, tuple(body.stop_token_ids),
                                                       body.ignore_eos), self.tokenizer, stops)
                       for i in range(body.n)]
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            usage = len(ids) if body.stream_options is not None and body.stream_options.include_usage else None
            return StreamingResponse(sse(streams, self.tokenizer, rid, body.model, chat, usage),
                                     media_type="text/event-stream")
        start = time.perf_counter()
        result, error = await collect(streams, self.tokenizer, rid, body.model, chat, len(ids))
        if error is not None:
            raise APIError(503, f"generation failed: {error}; retry", "server_error")
        # Engine time (queue + steps + detokenize) lets clients split latency into engine vs Serve/HTTP.
        engine_ms = f"{1000 * (time.perf_counter() - start):.3f}"
        return JSONResponse(result, headers={"x-gridserve-engine-ms": engine_ms})


def build_app(args: dict[str, Any]) -> Application:
    """Serve app builder (`import_path: deployments.serve_app:build_app`): validates args, sizes the replica group."""
    from deployments.make_model import ensure_default_model

    return make_app(GridServeConfig(**ensure_default_model(dict(args))))


def make_app(cfg: GridServeConfig, **deployment_options: Any) -> Application:
    """The deployment with one placement group per replica: bundle 0 for the replica, one bundle per worker."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    resource = cfg.resource if cfg.resource != "auto" else ("GPU" if gpus else "CPU")
    worker = {"GPU": 1.0} if resource == "GPU" else {"CPU": cfg.cpus_per_worker}
    bundles = [{"CPU": cfg.replica_cpus}] + [dict(worker) for _ in range(cfg.world_size)]
    # Serve's default of 5 ongoing requests would hold requests at the proxy, outside our batch. Let more reach
    # the replica than its engine runs or queues, so the excess gets our prompt 503 + Retry-After instead of
    # waiting in an unbounded proxy queue.
    options = {"max_ongoing_requests": 2 * (cfg.max_num_seqs + cfg.max_waiting_requests), **deployment_options}
    return LLMServer.options(placement_group_bundles=bundles, placement_group_strategy="PACK",
                             ray_actor_options={"num_cpus": cfg.replica_cpus}, **options).bind(cfg.model_dump())
