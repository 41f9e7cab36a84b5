"""The one place a model's tokenizer is loaded (Hugging Face folders; GGUF files carry theirs in metadata)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.shard.gguf import gguf_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer, or None for a folder without one (then requests must give token ids)."""
    from transformers import AutoTokenizer

    path = gguf_file(model)
    if path is not None:
        return gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(model) if any((Path(model) / n).exists() for n in TOKENIZER_FILES) else None


def gguf_tokenizer(path: Path) -> Any:
    """The tokenizer transformers builds from a GGUF file's vocabulary, with the file's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not tok.chat_template:  # transformers 5.x copies it over; older versions did not
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get("tokenizer.chat_template")
        tok.chat_template = field.contents() if field is not None else None
    return tok
