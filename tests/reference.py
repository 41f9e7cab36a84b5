"""Hugging Face reference outputs, and a driver loop and a one-step prefill over any grid, shared by unit and cluster
tests."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.shard.runner import StepInput
from actors.shard.sampler import SamplingParams
from cluster.engine import AsyncEngine
from cluster.generate import Request, generate_all
from cluster.request import GenerationParams

PROMPTS = [[3, 17, 5, 42, 8, 11, 2, 60, 33, 9], [7, 7, 1, 30], [50, 12, 4, 19, 25, 26, 27]]


def hf_greedy(model_dir: Path, prompt: list[int], new_tokens: int, hf: Any = None) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation and last-prompt-position logits from transformers itself (fp32; `hf`: loaded already)."""
    import transformers

    if hf is None:
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.eval()
    hf.generation_config.eos_token_id = None  # run to the full length, like ignore_eos
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = hf(ids).logits[0, -1].float()
        out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist(), logits


def grid_greedy(grid: Any, prompts: list[list[int]], new_tokens: int, block_size: int,
                max_model_len: int = 256) -> list[list[int]]:
    """Greedy continuations of all prompts run together through `grid` (EOS ignored)."""
    reqs = [Request(i, p, greedy(new_tokens)) for i, p in enumerate(prompts)]

    async def main() -> list[list[int]]:
        engine = AsyncEngine(grid, block_size, 8, max_model_len, max_model_len)
        try:
            return [r.token_ids for r in await generate_all(engine, reqs)]
        finally:
            grid.close_dag()  # inside the loop that ran it: its channel tasks end cleanly

    return asyncio.run(main())


def prefill_logits(grid: Any, prompt: list[int]) -> np.ndarray:
    """Last-position logits of one prompt after a single prefill step (into blocks 0..) of `grid`."""
    n = len(prompt)
    step = StepInput(np.asarray(prompt, dtype=np.int64), np.arange(n, dtype=np.int64), [n], [n],
                     [list(range(-(-n // 4)))], [SamplingParams(temperature=0.0)], [0], return_logits=True)
    out = grid.execute(step)
    assert out.logits is not None
    return out.logits[0]


def greedy(max_tokens: int, ignore_eos: bool = True) -> GenerationParams:
    """Greedy generation of exactly `max_tokens` tokens (EOS ignored unless asked)."""
    return GenerationParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
