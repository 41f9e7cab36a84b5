"""Multi-LoRA on the sharded model: three PEFT adapters and the base model in one batch equal HF + peft greedy at
every layout; bad adapters are refused by name and leave the slots as they were; the prefix cache keeps adapters
apart."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from actors.shard.sampler import SamplingParams
from cluster.engine import AsyncEngine
from tests.local_grid import LocalGrid
from tests.lora_adapters import ADAPTERS, ALL, NEW, PAIRS, PROMPT4, write_adapter


def load_all(grid: LocalGrid, adapters: dict[str, Path]) -> None:
    """Put the adapters into slots 0.. in order."""
    async def main() -> None:
        for slot, name in enumerate(adapters):
            await grid.load_lora(slot, name, str(adapters[name]))
    asyncio.run(main())


def run(grid: LocalGrid, adapters: dict[str, Path], pairs: list[tuple[list[int], str | None]]
        ) -> tuple[list[list[int]], AsyncEngine]:
    """Run every (prompt, adapter) pair at once (adapters in slots 0.. in order); greedy tokens per pair."""
    slots = {name: k for k, name in enumerate(adapters)}

    async def main() -> tuple[list[list[int]], AsyncEngine]:
        engine = AsyncEngine(grid, 4, 16, 256, 256)
        streams = [engine.generate(p, SamplingParams(temperature=0.0), NEW, ignore_eos=True,
                                   lora=None if a is None else (slots[a], -2 - slots[a])) for p, a in pairs]

        async def tokens(stream: object) -> list[int]:
            return [ev.token_id async for ev in stream if ev.token_id is not None]  # type: ignore[attr-defined]

        return list(await asyncio.gather(*(tokens(s) for s in streams))), engine

    return asyncio.run(main())


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_mixed_adapters_in_one_batch_match_peft(lora_model_dir: Path, lora_adapters: dict, lora_reference: dict,
                                                tp: int,
                                                pp: int) -> None:
    """Base + three adapters (ranks 2, 4, 8; q/k/v/o/gate/up/down; rslora) decode HF + peft's greedy tokens."""
    grid = LocalGrid(str(lora_model_dir), tp, pp, num_blocks=96, block_size=4, max_loras=3, max_lora_rank=8)
    load_all(grid, lora_adapters)
    got, engine = run(grid, lora_adapters, PAIRS)
    want = [lora_reference[a][ALL.index(p)] for p, a in PAIRS]
    assert got == want
    if pp == 1:
        assert engine.stats.steps == NEW  # one prefill step, then one decode step per token: no step per adapter


def test_per_adapter_groups_match_peft(lora_model_dir: Path, lora_adapters: dict, lora_reference: dict,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for steps with more adapters than the mask covers (gather, matmuls, scatter per slot) agrees too."""
    from actors.shard import lora

    monkeypatch.setattr(lora, "MASKED_MAX_ADAPTERS", 1)
    grid = LocalGrid(str(lora_model_dir), 2, 1, num_blocks=96, block_size=4, max_loras=3, max_lora_rank=8)
    load_all(grid, lora_adapters)
    got, _ = run(grid, lora_adapters, PAIRS)
    assert got == [lora_reference[a][ALL.index(p)] for p, a in PAIRS]
    assert grid.stages[0][0].lora is not None and len(grid.stages[0][0].lora.batch.groups) > 1


def test_speculative_drafts_verify_under_each_adapter(lora_model_dir: Path, lora_adapters: dict,
                                                      lora_reference: dict) -> None:
    """n-gram drafts are verified with the sequence's own adapter: output still HF + peft's, drafts were made."""
    from cluster.speculative import SpeculativeConfig

    grid = LocalGrid(str(lora_model_dir), 2, 1, num_blocks=96, block_size=4, max_loras=3, max_lora_rank=8)
    load_all(grid, lora_adapters)
    slots = {name: k for k, name in enumerate(lora_adapters)}

    async def main() -> tuple[list[list[int]], int]:
        engine = AsyncEngine(grid, 4, 16, 256, 256, speculative=SpeculativeConfig(num_speculative_tokens=3))
        streams = [engine.generate(p, SamplingParams(temperature=0.0), NEW, ignore_eos=True,
                                   lora=None if a is None else (slots[a], -2 - slots[a])) for p, a in PAIRS]
        async def tokens(stream: object) -> list[int]:
            return [ev.token_id async for ev in stream if ev.token_id is not None]  # type: ignore[attr-defined]

        got = list(await asyncio.gather(*(tokens(s) for s in streams)))
        return got, engine.scheduler.draft_tokens

    got, drafted = asyncio.run(main())
    assert got == [lora_reference[a][ALL.index(p)] for p, a in PAIRS] and drafted > 0


def test_preempted_sequences_recompute_under_their_adapter(lora_model_dir: Path, lora_adapters: dict,
                                                           lora_reference: dict) -> None:
    """A KV cache too small for the batch: preempted sequences are recomputed with their own adapter (and never
    reuse another adapter's cached blocks), still HF + peft's tokens."""
    grid = LocalGrid(str(lora_model_dir), 1, 1, num_blocks=14, block_size=4, max_loras=3, max_lora_rank=8)
    load_all(grid, lora_adapters)
    got, engine = run(grid, lora_adapters, PAIRS)
    assert engine.scheduler.num_preemptions > 0
    assert got == [lora_reference[a][ALL.index(p)] for p, a in PAIRS]


def test_adapters_change_the_output(lora_reference: dict) -> None:
    """The oracle is not vacuous: every adapter changes some prompt's greedy tokens."""
    for name in ADAPTERS:
        assert lora_reference[name] != lora_reference[None], f"adapter {name} left every output as the base model's"


def test_prefix_cache_never_shares_kv_across_adapters(lora_model_dir: Path, lora_adapters: dict,
                                                      lora_reference: dict) -> None:
    """The same prompt under the base model, then an adapter, then the adapter again: only the repeat hits."""
    grid = LocalGrid(str(lora_model_dir), 1, 1, num_blocks=64, block_size=4, max_loras=3, max_lora_rank=8)
    load_all(grid, lora_adapters)
    slot = list(lora_adapters).index("all-r4")

    async def main() -> list[tuple[list[int], int | None]]:
        engine = AsyncEngine(grid, 4, 8, 256, 256)
        out = []
        for lora in (None, (slot, -2 - slot), (slot, -2 - slot)):
            events = [ev async for ev in engine.generate(PROMPT4, SamplingParams(temperature=0.0), NEW,
                                                         ignore_eos=True, lora=lora)]
            out.append(([e.token_id for e in events if e.token_id is not None], events[0].cached_tokens))
        return out

    (base, hit0), (first, hit1), (again, hit2) = asyncio.run(main())
    assert base == lora_reference[None][3] and first == again == lora_reference["all-r4"][3]
    assert hit0 == 0 and hit1 == 0 and hit2 == 8  # the repeat reuses its own two full prompt blocks


def bad_adapters(model_dir: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Adapters that must be refused, each with a piece of the error it must raise."""
    too_big = write_adapter(model_dir, root / "too-big", 16, 16, ["q_proj"])
    unknown = write_adapter(model_dir, root / "unknown", 4, 8, ["q_proj", "lm_head"])
    other = write_adapter(model_dir, root / "other-model", 4, 8, ["q_proj"])
    tensors = load_file(other / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    save_file({**tensors, key: tensors[key][:32]}, other / "adapter_model.safetensors")  # as for a narrower model
    half = write_adapter(model_dir, root / "half", 4, 8, ["q_proj", "v_proj"])
    tensors = load_file(half / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"]
    save_file(tensors, half / "adapter_model.safetensors")
    missing = write_adapter(model_dir, root / "missing", 4, 8, ["q_proj"])
    (missing / "adapter_model.safetensors").unlink()
    dora = write_adapter(model_dir, root / "dora", 4, 8, ["q_proj"])
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    return {"too-big": (too_big, "max_lora_rank=8"), "unknown": (unknown, "lm_head"),
            "other-model": (other, "layers.1.self_attn.q_proj.lora_B.weight has shape [32, 4]"),
            "missing": (missing, "no adapter_model.safetensors"), "dora": (dora, "use_dora"),
            "half": (half, "layers.2.self_attn.v_proj.lora_A.weight is missing")}


def test_bad_adapters_are_refused_and_the_slot_keeps_serving(lora_model_dir: Path, lora_adapters: dict,
                                                              lora_reference: dict, tmp_path: Path) -> None:
    """Each bad adapter raises ValueError naming it and the problem; the slot still holds the adapter it had."""
    grid = LocalGrid(str(lora_model_dir), 2, 1, num_blocks=64, block_size=4, max_loras=3, max_lora_rank=8)
    load_all(grid, lora_adapters)
    for name, (path, needle) in bad_adapters(lora_model_dir, tmp_path).items():
        with pytest.raises(ValueError) as err:
            asyncio.run(grid.load_lora(0, name, str(path)))
        assert f"LoRA adapter {name!r}" in str(err.value) and needle in str(err.value), str(err.value)
    got, _ = run(grid, lora_adapters, PAIRS[:4])
    assert got == [lora_reference[a][ALL.index(p)] for p, a in PAIRS[:4]]
