"""Multi-LoRA on a real Ray grid at tp=2: adapters loaded into every worker's slots, a mixed batch equal to HF +
peft, a bad adapter refused with its own ValueError (no Ray traceback) while the grid keeps serving."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors.shard.sampler import SamplingParams
from cluster.engine import AsyncEngine
from tests.lora_adapters import ALL, NAMES, NEW, PAIRS, peft_greedy, write_adapter, write_adapters
from tests.ray_grid import make_grid

pytestmark = pytest.mark.slow  # a Ray cluster per module


def test_mixed_adapters_on_a_ray_grid_match_peft(local_ray: None, model_dirs: dict, tmp_path: Path) -> None:
    """Three adapters and the base model in one batch over two Ray workers decode HF + peft's greedy tokens."""
    d = Path(model_dirs["llama_gqa"])
    adapters = write_adapters(d, tmp_path)
    reference = {name: peft_greedy(d, adapters[name] if name else None, ALL, NEW) for name in NAMES}
    bad = write_adapter(d, tmp_path / "bad", 16, 16, ["q_proj"])
    grid = make_grid(str(d), 2, 1, enable_lora=True, max_loras=3, max_lora_rank=8)
    slots = {name: k for k, name in enumerate(adapters)}

    async def main() -> list[list[int]]:
        for name, slot in slots.items():
            await grid.load_lora(slot, name, str(adapters[name]))
        with pytest.raises(ValueError, match=r"^LoRA adapter 'bad': rank r=16 exceeds max_lora_rank=8"):
            await grid.load_lora(0, "bad", str(bad))
        engine = AsyncEngine(grid, 4, 16, 256, 256)
        streams = [engine.generate(p, SamplingParams(temperature=0.0), NEW, ignore_eos=True,
                                   lora=None if a is None else (slots[a], -2 - slots[a])) for p, a in PAIRS]

        async def tokens(stream: object) -> list[int]:
            return [ev.token_id async for ev in stream if ev.token_id is not None]  # type: ignore[attr-defined]
        try:
            return list(await asyncio.gather(*(tokens(s) for s in streams)))
        finally:
            grid.close_dag()

    try:
        assert asyncio.run(main()) == [reference[a][ALL.index(p)] for p, a in PAIRS]
    finally:
        grid.shutdown()
