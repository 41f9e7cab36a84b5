"""Seeded random PEFT LoRA adapters for a test model, and Hugging Face + peft greedy references (the LoRA oracle)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.reference import PROMPTS

# name -> (rank, alpha, target modules, use_rslora): different ranks, modules and scalings.
ADAPTERS: dict[str, tuple[int, int, list[str], bool]] = {
    "all-r4": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "attn-r8": (8, 16, ["q_proj", "v_proj", "o_proj"], True),
    "mlp-r2": (2, 6, ["gate_proj", "up_proj", "down_proj", "k_proj"], False),
}

NEW = 10
PROMPT4 = [9, 21, 33, 45, 57, 69, 81, 93, 5, 17, 29, 41]  # three full blocks of 4: prefix caching has work
ALL = [*PROMPTS, PROMPT4]
NAMES: list[str | None] = [None, *ADAPTERS]
# Every (prompt, adapter) pair: each adapter and the base model on several prompts, all in one batch.
PAIRS = [(p, NAMES[(i + k) % len(NAMES)]) for i, p in enumerate(ALL) for k in range(2)]


def write_adapter(model_dir: Path, out: Path, rank: int, alpha: int, targets: list[str], rslora: bool = False,
                  seed: int = 0) -> Path:
    """Save a random LoRA (B nonzero: peft's init_lora_weights=False) for `model_dir` with save_pretrained."""
    import peft
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                          use_rslora=rslora)
    peft.get_peft_model(base, cfg).save_pretrained(out)
    return out


def write_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    """Every adapter of ADAPTERS for `model_dir`, each in its own folder under `root`."""
    return {name: write_adapter(model_dir, root / name, r, a, t, rs, seed=k + 1)
            for k, (name, (r, a, t, rs)) in enumerate(ADAPTERS.items())}


_ORACLES: dict[tuple[Path, tuple[tuple[int, ...], ...], int], tuple[dict[str, Path], dict[str | None, Any]]] = {}


def oracle(model_dir: Path, root: Path, prompts: list[list[int]], new_tokens: int
           ) -> tuple[dict[str, Path], dict[str | None, list[list[int]]]]:
    """ADAPTERS written under `root` and HF + peft's greedy tokens of `prompts` under each and the base model;
    computed once per session and model (test modules share them: `root` must outlive the session's tests)."""
    key = (model_dir, tuple(map(tuple, prompts)), new_tokens)
    if key not in _ORACLES:
        adapters = write_adapters(model_dir, root)
        reference = {name: peft_greedy(model_dir, adapters.get(name) if name else None, prompts, new_tokens)
                     for name in [None, *ADAPTERS]}
        _ORACLES[key] = adapters, reference
    return _ORACLES[key]


def peft_greedy(model_dir: Path, adapter: Path | None, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations from transformers with the adapter applied by peft itself (None: the base model)."""
    import peft
    import transformers

    from tests.reference import hf_greedy

    model: Any = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    return [hf_greedy(model_dir, p, new_tokens, hf=model)[0] for p in prompts]
