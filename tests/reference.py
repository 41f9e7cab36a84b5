"""Hugging Face reference outputs and a driver loop over any grid, shared by unit and cluster tests."""
from __future__ import annotations

from pathlib import Path

import torch

from actors.shard.sampler import SamplingParams
from cluster.generate import Executor, Generator, Request

PROMPTS = [[3, 17, 5, 42, 8, 11, 2, 60, 33, 9], [7, 7, 1, 30], [50, 12, 4, 19, 25, 26, 27]]


def hf_greedy(model_dir: Path, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation and last-prompt-position logits from transformers itself (fp32)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = hf(ids).logits[0, -1].float()
        out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist(), logits


def grid_greedy(grid: Executor, prompts: list[list[int]], new_tokens: int, block_size: int,
                max_model_len: int = 256) -> list[list[int]]:
    """Greedy continuations of all prompts run together through `grid` (EOS ignored)."""
    gen = Generator(grid, None, block_size, 8, max_model_len, max_model_len)
    for i, p in enumerate(prompts):
        gen.add(Request(i, p, SamplingParams(temperature=0.0), new_tokens))
    results = {r.request_id: r.token_ids for r in gen.run()}
    return [results[i] for i in range(len(prompts))]
