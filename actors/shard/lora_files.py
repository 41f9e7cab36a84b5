"""Read and check a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) against a model."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from actors.shard.spec import ModelSpec

# PEFT's module name -> (the block holding it, our fused layer, part of it; None = unfused).
TARGETS: dict[str, tuple[str, str, int | None]] = {
    "q_proj": ("self_attn", "qkv_proj", 0), "k_proj": ("self_attn", "qkv_proj", 1),
    "v_proj": ("self_attn", "qkv_proj", 2), "o_proj": ("self_attn", "o_proj", None),
    "gate_proj": ("mlp", "gate_up_proj", 0), "up_proj": ("mlp", "gate_up_proj", 1),
    "down_proj": ("mlp", "down_proj", None),
}
KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight$")
# adapter_config.json settings that change the math in ways this server does not implement, with their neutral value.
UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "fan_in_fan_out": False,
               "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "lora_bias": False}
FIX = "export a plain LoRA of the q/k/v/o/gate/up/down projections with peft's save_pretrained"


def adapter_error(name: str, problem: str, fix: str = FIX) -> ValueError:
    """A bad-adapter error naming the adapter, what is wrong and how to fix it."""
    return ValueError(f"LoRA adapter {name!r}: {problem}; {fix}")


def module_shape(spec: ModelSpec, module: str) -> tuple[int, int]:
    """(out, in) of a projection of the full (unsharded) model."""
    d, h, inter = spec.head_dim, spec.hidden_size, spec.intermediate_size
    return {"q_proj": (spec.num_heads * d, h), "k_proj": (spec.num_kv_heads * d, h),
            "v_proj": (spec.num_kv_heads * d, h), "o_proj": (h, spec.num_heads * d),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}[module]


@dataclass
class Adapter:
    """A checked LoRA adapter, whole (every rank takes its slice when loading it into a slot)."""

    name: str
    path: str
    rank: int
    scale: float  # lora_alpha / r (or / sqrt(r) with use_rslora), folded into B when loaded
    # (global layer index, PEFT module name) -> (A [r, in], B [out, r])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def read_config(name: str, path: str | Path, max_rank: int) -> tuple[int, float]:
    """(rank, scale) from a PEFT folder's adapter_config.json; ValueError naming the setting that is refused."""
    folder = Path(path)
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise adapter_error(name, f"no adapter_config.json in {str(path)!r}",
                            "point lora_path at a folder written by peft's save_pretrained")
    try:
        cfg: dict[str, Any] = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise adapter_error(name, f"{cfg_file} is not valid JSON ({exc})", "re-export the adapter") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise adapter_error(name, f"peft_type={cfg.get('peft_type')!r} is not LORA", FIX)
    for key, neutral in UNSUPPORTED.items():
        if cfg.get(key) is not None and cfg[key] != neutral:
            raise adapter_error(name, f"adapter_config.json sets {key}={cfg[key]!r}, which is not supported "
                                f"(only {key}={neutral!r})", FIX)
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise adapter_error(name, f"adapter_config.json has r={rank!r}, expected a positive integer", FIX)
    if rank > max_rank:
        raise adapter_error(name, f"rank r={rank} exceeds max_lora_rank={max_rank}",
                            f"raise max_lora_rank to at least {rank} or use a lower-rank adapter")
    alpha = float(cfg.get("lora_alpha", 8))
    return rank, alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def read_adapter(name: str, path: str | Path, spec: ModelSpec, max_rank: int, load: bool = True) -> Adapter:
    """Read and check a PEFT LoRA folder against `spec`: every key known, every shape right, both halves present
    (shapes from the file's header; the tensors are read only with `load`)."""
    rank, scale = read_config(name, path, max_rank)
    file = Path(path) / "adapter_model.safetensors"
    if not file.is_file():
        pickled = (Path(path) / "adapter_model.bin").is_file()
        raise adapter_error(name, f"no adapter_model.safetensors in {str(path)!r}"
                            + (" (only adapter_model.bin, a pickle gridserve refuses to load)" if pickled else ""),
                            "save the adapter with peft's save_pretrained(..., safe_serialization=True)")
    adapter = Adapter(name, str(path), rank, scale)
    try:
        with safe_open(file, framework="pt") as f:
            keys = {parse_key(name, key, spec): key for key in f.keys()}
            if not keys:
                raise adapter_error(name, f"{file} holds no LoRA weights", FIX)
            for layer, module in sorted({(k[0], k[1]) for k in keys}):
                pair = [keys.get((layer, module, half)) for half in "AB"]
                check_pair(name, layer, module, [f.get_slice(k).get_shape() if k else None for k in pair], rank,
                           spec)
                if load:
                    adapter.weights[(layer, module)] = (f.get_tensor(pair[0]), f.get_tensor(pair[1]))
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own error types for truncated or corrupt files
        raise adapter_error(name, f"{file} is unreadable ({exc})", "re-export the adapter") from None
    return adapter


def parse_key(name: str, key: str, spec: ModelSpec) -> tuple[int, str, str]:
    """(layer, module, 'A' or 'B') of a PEFT tensor name; ValueError for anything this server cannot apply."""
    m = KEY.match(key)
    if m is None or m.group(3) not in TARGETS or TARGETS[m.group(3)][0] != m.group(2):
        raise adapter_error(name, f"tensor {key!r} targets a module LoRA is not supported on here",
                            f"target only {', '.join(TARGETS)} (peft's target_modules)")
    layer = int(m.group(1))
    if layer >= spec.num_layers:
        raise adapter_error(name, f"tensor {key!r} is for layer {layer} but the model has {spec.num_layers}",
                            "use an adapter trained for this base model")
    return layer, m.group(3), m.group(4)


def check_pair(name: str, layer: int, module: str, shapes: list[list[int] | None], rank: int,
               spec: ModelSpec) -> None:
    """One module's A and B shapes (None: absent): both present, [r, in] and [out, r] for this model."""
    prefix = f"base_model.model.model.layers.{layer}.{TARGETS[module][0]}.{module}"
    for half, shape in zip("AB", shapes):
        if shape is None:
            raise adapter_error(name, f"tensor {prefix}.lora_{half}.weight is missing (its lora_"
                                f"{'B' if half == 'A' else 'A'} is there)", "re-export the adapter")
    out, inp = module_shape(spec, module)
    for half, shape, want in zip("AB", shapes, ([rank, inp], [out, rank])):
        if list(shape or []) != want:
            raise adapter_error(name, f"tensor {prefix}.lora_{half}.weight has shape {list(shape or [])}, "
                                f"expected {want} (r={rank} and the base model's {module})",
                                "use an adapter trained for this base model, with one rank r for every module")
