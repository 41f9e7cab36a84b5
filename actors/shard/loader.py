"""Safetensors shard loader: each rank reads only the slices it owns, and every key is checked."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from actors.shard.layers import LazySlice, SliceIndex
from actors.shard.spec import ModelSpec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Checkpoint q/k/v and gate/up tensors land in our fused parameters: (fused name, part index).
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some old exports carry


class CheckpointReader:
    """Lazy, slice-wise access to the tensors of a local safetensors checkpoint folder."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise ValueError(f"model: {str(model_dir)!r} is not a folder; give a local Hugging Face model folder")
        self.key_file = self._index()
        self._handles: dict[str, Any] = {}

    def _index(self) -> dict[str, str]:
        """Map every tensor name to the file holding it (index json, or the files' own headers)."""
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise ValueError(f"model: {self.dir} holds pickle checkpoints {pickles}, which gridserve refuses "
                                 "to load (unpickling runs arbitrary code); convert them to safetensors, e.g. "
                                 "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                                 "safe_serialization=True)`")
            raise ValueError(f"model: no *.safetensors files in {self.dir}")
        mapping: dict[str, str] = {}
        for name in files:
            try:
                with safe_open(self.dir / name, framework="pt") as f:
                    mapping.update({key: name for key in f.keys()})
            except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
                raise ValueError(f"checkpoint file {self.dir / name} is unreadable ({exc}); re-download or "
                                 "re-export it") from exc
        return mapping

    def spec(self) -> ModelSpec:
        """The model's architecture numbers, from the folder's config.json."""
        return ModelSpec.from_dir(self.dir)

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return sorted(self.key_file)

    def get_slice(self, key: str) -> LazySlice:
        """A lazy handle on `key`: indexing it reads only the requested part from disk."""
        name = self.key_file[key]
        if name not in self._handles:
            path = self.dir / name
            if not path.is_file():
                raise ValueError(f"checkpoint index names {name!r} for {key!r} but {path} does not exist")
            try:
                self._handles[name] = safe_open(path, framework="pt")
            except Exception as exc:  # safetensors raises its own error types for truncated files
                raise ValueError(f"checkpoint file {path} is unreadable ({exc}); re-download or re-export it") from exc
        handle: LazySlice = self._handles[name].get_slice(key)  # safetensors' slice type is not exported
        return handle


class TensorSlice:
    """In-memory stand-in for a safetensors slice (tests, state dicts already in RAM)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        """Full shape of the tensor."""
        return list(self.tensor.shape)

    def __getitem__(self, index: SliceIndex) -> torch.Tensor:
        """The requested part of the tensor."""
        return self.tensor[index]


def expected_keys(spec: ModelSpec) -> tuple[set[str], set[str]]:
    """(required, optional) checkpoint keys for the whole model, independent of how it is split."""
    req = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        req |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        req |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        req |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        if spec.qkv_bias:
            req |= {p + f"self_attn.{n}_proj.bias" for n in "qkv"}
        if spec.o_bias:
            req.add(p + "self_attn.o_proj.bias")
        if spec.mlp_bias:
            req |= {p + f"mlp.{n}_proj.bias" for n in ("gate", "up", "down")}
    opt = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    if not spec.tie_word_embeddings:
        req.add("lm_head.weight")
    return req, opt


def check_keys(spec: ModelSpec, keys: Iterable[str]) -> None:
    """Raise naming every missing and unexpected checkpoint key."""
    present = {k for k in keys if not IGNORED.match(k)}
    required, optional = expected_keys(spec)
    missing = sorted(required - present)
    unexpected = sorted(present - required - optional)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model's config: missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")


def target_of(key: str) -> tuple[str, int | None]:
    """Our parameter name and fused part for checkpoint `key` (identity for unfused tensors)."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in FUSED:
        fused, part = FUSED[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), part
    return key, None


def load_stage(model: nn.Module, keys: Iterable[str], get_slice: Callable[[str], LazySlice],
               spec: ModelSpec) -> None:
    """Fill every parameter of one stage's shard, reading only this rank's slices."""
    keys = list(keys)
    check_keys(spec, keys)
    params = dict(model.named_parameters(remove_duplicate=False))
    owners = dict(model.named_modules())
    filled: set[str] = set()
    sources = list(keys)
    if spec.tie_word_embeddings and "lm_head.weight" not in keys and "lm_head.weight" in params:
        sources.append("lm_head.weight")  # read from the embedding below
    for key in sources:
        name, part = target_of(key)
        if name not in params:
            continue  # belongs to another pipeline stage
        src_key = "model.embed_tokens.weight" if key == "lm_head.weight" and key not in keys else key
        owner = owners[name.rsplit(".", 1)[0]]
        loader = owner.weight_loader
        args = (params[name], get_slice(src_key), src_key) + (() if part is None else (part,))
        loader(*args)
        filled.add(name)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise ValueError(f"parameters left unloaded (checkpoint lacks them): {unfilled[:20]}")
