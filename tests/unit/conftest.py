"""Fixtures shared by the unit modules: the LoRA test model, its adapters and their HF + peft references."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.lora_adapters import ALL, NEW, oracle


@pytest.fixture(scope="session")
def lora_model_dir(model_dirs: dict) -> Path:
    """The GQA Llama test model (2 KV heads: tp=2 splits them, tp=4 would replicate them)."""
    return Path(model_dirs["llama_gqa"])


@pytest.fixture(scope="session")
def lora_adapters(lora_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three random adapters of tests.lora_adapters.ADAPTERS, saved by peft (once per session)."""
    return oracle(lora_model_dir, tmp_path_factory.mktemp("loras"), ALL, NEW)[0]


@pytest.fixture(scope="session")
def lora_reference(lora_model_dir: Path, lora_adapters: dict[str, Path]) -> dict[str | None, list[list[int]]]:
    """HF + peft greedy tokens of every prompt of tests.lora_adapters.ALL under every adapter and the base model."""
    return oracle(lora_model_dir, Path(), ALL, NEW)[1]
