"""Multi-LoRA through the Replica: adapters chosen by name, more adapters than slots (requests wait, never fail),
unknown names refused, slots restored after a grid rebuild; the LoRA settings' checks."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from actors.shard.runner import StepInput, StepOutput
from cluster.config import ConfigError, GridServeConfig
from cluster.generate import collect
from cluster.replica import Replica
from cluster.request import GenerationParams, RequestError
from tests.local_grid import LocalGrid, config, grids
from tests.lora_adapters import ALL, NAMES, NEW, write_adapter
from tests.reference import greedy


class SlotWatchGrid(LocalGrid):
    """A LocalGrid that records the distinct adapter slots of every step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixes: list[set[int]] = []

    async def step_async(self, step: StepInput) -> StepOutput:
        self.mixes.append({s for s in step.lora or [] if s is not None})
        return await super().step_async(step)


def lora_replica(model_dir: Path, adapters: dict, tp: int = 1, **extra: Any) -> tuple[Replica, list[SlotWatchGrid]]:
    """A replica serving the three adapters from lora_modules with two slots; its grids, as built."""
    made: list[SlotWatchGrid] = []

    def make() -> SlotWatchGrid:
        made.append(SlotWatchGrid(str(model_dir), tp, 1, max_loras=2, max_lora_rank=8))
        return made[-1]
    cfg = config(model_dir, tensor_parallel_size=tp, enable_lora=True, max_loras=2, max_lora_rank=8,
                 lora_modules={k: str(v) for k, v in adapters.items()}, **extra)
    return Replica(cfg, "r0", grid_factory=make), made


def params(name: str | None) -> GenerationParams:
    """Greedy NEW tokens with adapter `name`."""
    return greedy(NEW).model_copy(update={"lora": name})


def test_three_adapters_over_two_slots_all_finish_correctly(lora_model_dir: Path, lora_adapters: dict,
                                                            lora_reference: dict) -> None:
    """Requests for three adapters and the base model at once with two slots: each step mixes at most two
    adapters, the third waits for a slot, and every answer equals HF + peft."""
    replica, grids_made = lora_replica(lora_model_dir, lora_adapters, tp=2)
    pairs = [(p, NAMES[(i + k) % len(NAMES)]) for i, p in enumerate(ALL) for k in range(3)]

    async def main() -> list[list[int]]:
        outs = await asyncio.gather(*(collect(replica.generate(p, params(a))) for p, a in pairs))
        return [o[0].token_ids for o in outs]

    assert asyncio.run(main()) == [lora_reference[a][ALL.index(p)] for p, a in pairs]
    mixes = grids_made[0].mixes
    assert max(len(m) for m in mixes) == 2 and len(set().union(*mixes)) == 2
    assert all(s.pins == 0 for s in replica.loras.slots)


def test_unknown_adapter_is_a_404(lora_model_dir: Path, lora_adapters: dict) -> None:
    """A name that is neither the model nor an adapter is refused with 404 model_not_found."""
    replica, _ = lora_replica(lora_model_dir, lora_adapters)

    async def main() -> None:
        await replica.loras.resolve("nope")

    with pytest.raises(RequestError) as err:
        asyncio.run(main())
    assert err.value.status == 404 and "'nope'" in str(err.value)


def test_batch_style_requests_name_the_model_or_an_adapter(lora_model_dir: Path, lora_adapters: dict,
                                                           lora_reference: dict) -> None:
    """`complete` (batch lines, Ray Data rows): the model's own name is the base model, an adapter's name that
    adapter, an unknown name a failed result naming it."""
    replica, _ = lora_replica(lora_model_dir, lora_adapters)

    async def main() -> list[Any]:
        return [await replica.complete(k, ALL[0], params(name)) for k, name in
                enumerate([replica.cfg.model_name, "mlp-r2", "nope"])]

    base, mlp, nope = asyncio.run(main())
    assert base.token_ids == lora_reference[None][0] and mlp.token_ids == lora_reference["mlp-r2"][0]
    assert nope.finish_reason == "error" and "'nope' does not exist" in (nope.error or "")


def test_rebuilt_grid_gets_the_resident_adapters_back(lora_model_dir: Path, lora_adapters: dict,
                                                      lora_reference: dict) -> None:
    """After a grid failure the rebuilt grid holds the same adapters in the same slots before serving again."""
    made: list[LocalGrid] = []

    def make() -> LocalGrid:
        made.append(LocalGrid(str(lora_model_dir), 1, 1, max_loras=2, max_lora_rank=8))
        return made[-1]
    cfg = config(lora_model_dir, enable_lora=True, max_loras=2, max_lora_rank=8,
                 lora_modules={k: str(v) for k, v in lora_adapters.items()})
    replica = Replica(cfg, "r0", grid_factory=grids(make, make))

    async def main() -> list[int]:
        await collect(replica.generate(ALL[0], params("attn-r8")))
        replica.engine.fail("test: a worker died")
        assert await replica.ready()
        return (await collect(replica.generate(ALL[1], params("attn-r8"))))[0].token_ids

    assert asyncio.run(main()) == lora_reference["attn-r8"][1]
    assert made[1].stages[0][0].lora is not None and "attn-r8" in made[1].stages[0][0].lora.names


def test_lora_settings_are_checked(lora_model_dir: Path, lora_adapters: dict, tmp_path: Path) -> None:
    """lora_modules need enable_lora; vLLM's list form works; an adapter above max_lora_rank is named."""
    with pytest.raises(ConfigError, match="enable_lora is false"):
        GridServeConfig.from_args({"model": str(lora_model_dir), "lora_modules": {"a": str(lora_adapters["all-r4"])}})
    cfg = GridServeConfig.from_args({"model": str(lora_model_dir), "enable_lora": True,
                                     "lora_modules": [f"a={lora_adapters['all-r4']}",
                                                      {"name": "b", "path": str(lora_adapters["mlp-r2"])}]})
    assert cfg.lora_modules == {"a": str(lora_adapters["all-r4"]), "b": str(lora_adapters["mlp-r2"])}
    big = write_adapter(lora_model_dir, tmp_path / "big", 32, 32, ["q_proj"])
    with pytest.raises(ConfigError, match=r"LoRA adapter 'big': rank r=32 exceeds max_lora_rank=16"):
        GridServeConfig.from_args({"model": str(lora_model_dir), "enable_lora": True,
                                   "lora_modules": {"big": str(big)}})
