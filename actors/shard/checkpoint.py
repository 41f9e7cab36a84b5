"""Which format a checkpoint is in (a Hugging Face safetensors folder or a GGUF file) and its spec and reader.

The one place that tells the formats apart: the format modules (spec, gguf, loader) never import it back.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from actors.shard.gguf import GGUFCheckpoint, gguf_file
from actors.shard.loader import CheckpointReader
from actors.shard.spec import ModelSpec


def model_spec(model: str | Path) -> ModelSpec:
    """The spec of any checkpoint `model` names: a Hugging Face folder, a .gguf file, or a folder with one."""
    path = gguf_file(model)
    if path is None:
        return ModelSpec.from_dir(model)
    stat = path.stat()
    return _gguf_spec(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def open_checkpoint(model: str | Path) -> CheckpointReader | GGUFCheckpoint:
    """The reader for whatever `model` names: a .gguf file (or a folder holding one), else a safetensors folder."""
    path = gguf_file(model)
    return GGUFCheckpoint(path) if path is not None else CheckpointReader(model)


@lru_cache(maxsize=8)
def _gguf_spec(path: str, mtime_ns: int, size: int) -> ModelSpec:
    """A GGUF file's spec, parsed once per process and file version: its metadata (the whole vocabulary with
    merges) takes seconds to parse, and config validation, placement and planning each ask for the spec."""
    return GGUFCheckpoint(Path(path)).spec()
