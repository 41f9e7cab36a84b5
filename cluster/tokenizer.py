"""The one place a model's tokenizer is loaded (Hugging Face folders; GGUF files carry theirs in metadata)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.shard.gguf import PlainReader, gguf_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer, or None for a folder without one (then requests must give token ids)."""
    from transformers import AutoTokenizer

    path = gguf_file(model)
    if path is not None:
        return gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(model) if any((Path(model) / n).exists() for n in TOKENIZER_FILES) else None


def gguf_tokenizer(path: Path) -> Any:
    """The tokenizer transformers builds from a GGUF file's vocabulary with the file's chat template (None if the
    file carries no vocabulary)."""
    from transformers import AutoTokenizer

    fields = PlainReader(path).fields
    if "tokenizer.ggml.model" not in fields:
        return None
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not tok.chat_template:  # transformers 5.x copies it over; older versions may not
        tok.chat_template = gguf_chat_template(fields)
    return tok


def gguf_chat_template(fields: dict[str, Any]) -> str | None:
    """The chat template in a parsed GGUF file's metadata fields, if any."""
    field = fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None
