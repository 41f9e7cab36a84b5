"""Multi-LoRA on the HTTP face, with vLLM's names: `model` selects an adapter, `/v1/models` lists adapters with
their `parent`, and `POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter` (with
`allow_runtime_lora_updating`) change the adapters every replica of the app serves.

Adapters loaded at runtime live in one small detached actor per app (the catalog) that every ingress and model
replica reaches: a model replica asks it when a request names an adapter it does not have from `lora_modules`, so
a load or unload holds for every replica at once. The catalog lives in memory: a Ray cluster restart forgets the
adapters loaded at runtime (load them again); `lora_modules` from the config are always served.
"""
# No `from __future__ import annotations` here: FastAPI must see real types on the route signatures.

import asyncio
from pathlib import Path
from typing import Any

import ray
from fastapi import Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from actors.shard.lora_files import read_adapter
from cluster.config import GridServeConfig
from cluster.request import GenerationParams, RequestError
from deployments.http import APIError, Ingress, api, parse_body


@ray.remote(num_cpus=0)
class LoraCatalog:
    """Adapters loaded at runtime: name -> (local folder, load number; each load gets a new one)."""

    def __init__(self) -> None:
        self.paths: dict[str, tuple[str, int]] = {}
        self.loads = 0

    def put(self, name: str, path: str, replace: bool) -> bool:
        """Register `name` (False if it exists and `replace` is off)."""
        if name in self.paths and not replace:
            return False
        self.loads += 1
        self.paths[name] = (path, self.loads)
        return True

    def drop(self, name: str) -> bool:
        """Forget `name` (False if it was not loaded)."""
        return self.paths.pop(name, None) is not None

    def get(self, name: str) -> tuple[str, int] | None:
        """The folder and load number of `name`, or None."""
        return self.paths.get(name)

    def all(self) -> dict[str, str]:
        """Every adapter loaded at runtime: name -> folder."""
        return {name: path for name, (path, _) in self.paths.items()}


def catalog(app: str) -> Any:
    """The app's catalog, made by whichever replica asks first."""
    return LoraCatalog.options(name=f"gridserve-loras-{app}", get_if_exists=True,  # type: ignore[attr-defined]
                               lifetime="detached").remote()


def catalog_lookup(app: str) -> Any:
    """What a model replica's LoRA registry asks for a name it does not know from lora_modules."""
    async def lookup(name: str) -> tuple[str, int] | None:
        found = await catalog(app).get.remote(name)
        return None if found is None else (str(found[0]), int(found[1]))
    return lookup


def served_model(cfg: GridServeConfig) -> str | None:
    """What parse_body checks `model` against: the model's name, or None when adapters are served (`selected`
    checks those)."""
    return None if cfg.enable_lora else cfg.model_name


def selected(cfg: GridServeConfig, model: str, params: GenerationParams) -> GenerationParams:
    """`params` with the adapter `model` names (404 for a name neither served nor possibly loaded at runtime)."""
    if model == cfg.model_name:
        return params
    if not cfg.enable_lora or (model not in cfg.lora_modules and not cfg.allow_runtime_lora_updating):
        known = [cfg.model_name, *cfg.lora_modules]
        raise RequestError(f"model {model!r} does not exist; this server serves {', '.join(map(repr, known))}",
                           "model", 404, "model_not_found")
    return params.model_copy(update={"lora": model})


async def model_cards(ingress: Any, created: int, max_len: int) -> list[dict[str, Any]]:
    """/v1/models entries of the adapters (vLLM's shape: `root` the folder, `parent` the base model)."""
    cfg: GridServeConfig = ingress.cfg
    if not cfg.enable_lora:
        return []
    adapters = dict(cfg.lora_modules)
    if cfg.allow_runtime_lora_updating:
        adapters.update(await catalog(serve.get_replica_context().app_name).all.remote())
    return [{"id": name, "object": "model", "created": created, "owned_by": "gridserve", "root": path,
             "parent": cfg.model_name, "max_model_len": max_len} for name, path in adapters.items()]


class LoadLoraRequest(BaseModel):
    """vLLM's body of POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, description="The name requests give as `model`.")
    lora_path: str = Field(min_length=1, description="Local PEFT folder on the server.")
    load_inplace: bool = Field(False, description="Replace an adapter of the same name already loaded.")


class UnloadLoraRequest(BaseModel):
    """vLLM's body of POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, description="The adapter to stop serving.")
    lora_int_id: int | None = Field(None, description="Accepted for vLLM compatibility; ignored.")


def check_runtime(ingress: Any, name: str) -> GridServeConfig:
    """The config, if runtime loading is on and `name` is not the model or a configured adapter (400 if not)."""
    cfg: GridServeConfig = ingress.cfg
    if not (cfg.enable_lora and cfg.allow_runtime_lora_updating):
        raise APIError(400, "loading LoRA adapters at runtime is off; start the server with enable_lora: true and "
                       "allow_runtime_lora_updating: true", param="lora_name")
    if name == cfg.model_name or name in cfg.lora_modules:
        raise APIError(400, f"{name!r} is the served model or an adapter from lora_modules; change the config to "
                       "change it", param="lora_name")
    return cfg


@api.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request, ingress: Ingress) -> Any:
    """Serve a PEFT adapter from a local folder on every replica (checked against the model first)."""
    ingress._authorize(request)
    body = await parse_body(request, LoadLoraRequest)
    cfg = check_runtime(ingress, body.lora_name)
    path = str(Path(body.lora_path).expanduser().resolve())
    try:
        await asyncio.to_thread(read_adapter, body.lora_name, path, cfg.spec(), cfg.max_lora_rank, False)
    except ValueError as exc:
        raise APIError(400, str(exc), param="lora_path") from None
    app = serve.get_replica_context().app_name
    if not await catalog(app).put.remote(body.lora_name, path, body.load_inplace):
        raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@api.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request, ingress: Ingress) -> Any:
    """Stop serving an adapter loaded at runtime (requests running on it finish)."""
    ingress._authorize(request)
    body = await parse_body(request, UnloadLoraRequest)
    check_runtime(ingress, body.lora_name)
    if not await catalog(serve.get_replica_context().app_name).drop.remote(body.lora_name):
        raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "not_found_error",
                       param="lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
