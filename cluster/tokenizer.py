"""The one place a model's tokenizer is loaded (Hugging Face folders; GGUF files carry theirs in metadata)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer, or None for a folder without one (then requests must give token ids)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model) if any((Path(model) / n).exists() for n in TOKENIZER_FILES) else None
