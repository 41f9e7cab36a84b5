"""The one place a model's tokenizer is loaded (Hugging Face folders; GGUF files carry theirs in metadata)."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from actors.shard.gguf import PlainReader, gguf_file
from cluster.cache import cache_dir
from cluster.request import RequestError

log = logging.getLogger("gridserve")

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
    file carries no vocabulary); built once per file version and machine, then read back from the cache (building
    it converts the whole vocabulary and merges in Python, seconds that every replica would pay otherwise)."""
    import transformers
    from transformers import AutoTokenizer

    stat = path.resolve().stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    cached = cache_dir() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:24]
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tok = _build_gguf_tokenizer(path)
    if tok is not None:
        try:
            tok.save_pretrained(cached)
        except OSError as exc:  # a read-only home still serves, only slower to start
            log.warning("could not cache the tokenizer of %s in %s (%s)", path, cached, exc)
    return tok


def _build_gguf_tokenizer(path: Path) -> Any:
    """Convert a GGUF file's vocabulary into a transformers tokenizer (None if it has none)."""
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


def prompt_ids(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt given as text or as ids (RequestError for text without a tokenizer)."""
    if isinstance(prompt, list):
        return list(prompt)
    if tokenizer is None:
        raise RequestError("this model folder has no tokenizer; send the prompt as token ids", "prompt")
    return list(tokenizer.encode(prompt))
