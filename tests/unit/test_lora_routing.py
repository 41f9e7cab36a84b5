"""LoRA on the faces without a cluster: the prefix router prefers replicas holding a request's adapter; `model`
selects the adapter (or is a 404); batch lines take `model`."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest

from cluster.config import GridServeConfig
from cluster.request import GenerationParams, RequestError
from deployments.batch_io import line_request, validate_line
from deployments.lora_api import selected, served_model
from tests.unit.test_prefix_router import FakeReplica, router

PROMPT = list(range(40))


def holding(name: str, loras: list[str], running: int = 0) -> FakeReplica:
    """A replica reporting `loras` resident and `running` requests."""
    replica = FakeReplica(name)
    replica.routing_stats.update(loras=loras, running=running)
    return replica


def choose(replicas: list[FakeReplica], adapter: str | None, imbalance: int = 8) -> set[str]:
    """The replicas of the router's first rank for a generation with `adapter`."""
    params = GenerationParams(lora=adapter)

    async def decide() -> Any:
        pending = PendingRequest(args=[PROMPT, params], kwargs={}, metadata=RequestMetadata(
            request_id="r", internal_request_id="i", call_method="generate"))
        return await router(imbalance).choose_replicas(replicas, pending)  # type: ignore[arg-type]

    return {r.replica_id.unique_id for r in asyncio.run(decide())[0]}


def test_router_prefers_a_replica_holding_the_adapter() -> None:
    """Only the holder is tried first; base requests and unheld adapters go anywhere; an overloaded holder yields."""
    replicas = [holding("a", []), holding("b", ["sql"]), holding("c", ["chat"])]
    assert choose(replicas, "sql") == {"b"}
    assert len(choose(replicas, None)) == 2 and len(choose(replicas, "other")) == 2
    busy = [holding("a", []), holding("b", ["sql"], running=20), holding("c", [])]
    assert router(8).adapter_holders(busy, "sql") == busy  # type: ignore[arg-type]
    assert router(30).adapter_holders(busy, "sql") == [busy[1]]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lora_cfg(model_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> GridServeConfig:
    """A config serving one adapter from lora_modules."""
    from tests.lora_adapters import write_adapter

    d = Path(model_dirs["llama_gqa"])
    adapter = write_adapter(d, tmp_path_factory.mktemp("lora") / "sql", 4, 8, ["q_proj"])
    return GridServeConfig(model=str(d), served_model_name="base", enable_lora=True, lora_modules={"sql": str(adapter)})


def test_model_selects_an_adapter_or_is_a_404(lora_cfg: GridServeConfig) -> None:
    """The model's name is the base model, an adapter's name selects it, anything else is a 404 (runtime off)."""
    assert served_model(lora_cfg) is None  # the face checks names itself once adapters are served
    params = GenerationParams()
    assert selected(lora_cfg, "base", params).lora is None
    assert selected(lora_cfg, "sql", params).lora == "sql"
    with pytest.raises(RequestError) as err:
        selected(lora_cfg, "nope", params)
    assert err.value.status == 404 and err.value.code == "model_not_found" and "'sql'" in str(err.value)
    runtime = lora_cfg.model_copy(update={"allow_runtime_lora_updating": True})
    assert selected(runtime, "later", params).lora == "later"  # the replicas ask the app's catalog


def test_batch_lines_take_model() -> None:
    """A batch line's `model` reaches the replica as the adapter to use."""
    line = validate_line({"prompt_token_ids": [1, 2, 3], "model": "sql", "max_tokens": 2})
    from cluster.request import Limits

    _, params = line_request(line, None, Limits(64, 64, 96))
    assert params.lora == "sql"


def test_load_routes_refuse_without_runtime_loading(lora_cfg: GridServeConfig) -> None:
    """With allow_runtime_lora_updating off the load/unload routes answer 400 saying how to turn it on; with it on
    the served model's and configured adapters' names are still refused (they change in the config only)."""
    from types import SimpleNamespace

    from deployments.http import APIError
    from deployments.lora_api import check_runtime

    with pytest.raises(APIError) as err:
        check_runtime(SimpleNamespace(cfg=lora_cfg), "new")
    assert err.value.status == 400 and "allow_runtime_lora_updating: true" in err.value.message
    runtime = SimpleNamespace(cfg=lora_cfg.model_copy(update={"allow_runtime_lora_updating": True}))
    assert check_runtime(runtime, "new") is runtime.cfg
    for taken in ("base", "sql"):
        with pytest.raises(APIError, match="lora_modules"):
            check_runtime(runtime, taken)
