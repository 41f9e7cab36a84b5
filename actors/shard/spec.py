"""What the math needs from a Hugging Face `config.json`, and how its heads split over TP ranks."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# Keys under which Hugging Face configs give the context length; the smallest present wins (as in vLLM).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "model_max_length")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a decoder-only Llama-family model."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    dtype: str
    eos_token_ids: tuple[int, ...] = field(default=())

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelSpec:
        """Read `config.json` from a local Hugging Face model folder."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"model: no config.json in {str(model_dir)!r}; point `model` at a local "
                             "Hugging Face model folder (make one with `python -m deployments.make_model`) or "
                             "at a .gguf file")
        return cls.from_hf_dict(json.loads(path.read_text()))

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelSpec:
        """Build a spec from a parsed `config.json`, refusing architectures we do not implement."""
        archs = cfg.get("architectures") or []
        family = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if family is None:
            raise ValueError(f"model architectures {archs} are not supported; supported: {sorted(SUPPORTED)}")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: 'default', 'llama3'")
        window = cfg.get("sliding_window")
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            family=family,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=min((int(cfg[k]) for k in CONTEXT_KEYS if cfg.get(k)), default=2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always biases q/k/v; Llama biases q/k/v/o only with attention_bias; Mistral never.
            qkv_bias=family == "qwen2" or (family == "llama" and bool(cfg.get("attention_bias"))),
            o_bias=family == "llama" and bool(cfg.get("attention_bias")),
            mlp_bias=family == "llama" and bool(cfg.get("mlp_bias")),
            sliding_window=window,
            dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            eos_token_ids=eos_ids,
        )

    def valid_tp_sizes(self, limit: int = 64) -> list[int]:
        """Every tp in 1..limit that splits the query heads, the KV heads and the MLP evenly."""
        return [t for t in range(1, limit + 1) if self._tp_problem(t) is None]

    def check_tp(self, tp: int) -> None:
        """Raise a ValueError naming the head counts and the valid tp values if `tp` cannot split this model."""
        problem = self._tp_problem(tp)
        if problem is not None:
            raise ValueError(
                f"tensor_parallel_size={tp} does not fit this model: {problem} "
                f"(num_attention_heads={self.num_heads}, num_key_value_heads={self.num_kv_heads}, "
                f"intermediate_size={self.intermediate_size}); valid tensor_parallel_size values: "
                f"{self.valid_tp_sizes()}")

    def check_pp(self, pp: int) -> None:
        """Raise a ValueError unless every pipeline stage gets at least one layer."""
        if not 1 <= pp <= self.num_layers:
            raise ValueError(f"pipeline_parallel_size={pp} must be between 1 and the model's "
                             f"num_hidden_layers={self.num_layers}")

    def _tp_problem(self, tp: int) -> str | None:
        """Why `tp` cannot split this model, or None if it can."""
        if tp < 1:
            return "it must be at least 1"
        if self.num_heads % tp:
            return f"{self.num_heads} query heads do not divide by {tp}"
        if tp <= self.num_kv_heads and self.num_kv_heads % tp:
            return f"{self.num_kv_heads} KV heads do not divide by {tp}"
        if tp > self.num_kv_heads and tp % self.num_kv_heads:
            return f"tp > {self.num_kv_heads} KV heads needs tp to be a multiple of them (KV heads are replicated)"
        if self.intermediate_size % tp:
            return f"intermediate_size {self.intermediate_size} does not divide by {tp}"
        return None

    def torch_dtype(self, override: str | None = None) -> torch.dtype:
        """The compute dtype: `override` if given, else the checkpoint's."""
        name = override or self.dtype
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
        return DTYPES[name]


@dataclass(frozen=True)
class HeadSplit:
    """How one TP rank's share of attention heads is laid out."""

    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    kv_head_start: int  # first checkpoint KV head this rank holds
    kv_replicas: int  # how many ranks hold the same KV head (tp > num_kv_heads)

    @classmethod
    def of(cls, spec: ModelSpec, tp_rank: int, tp_size: int) -> HeadSplit:
        """Split `spec`'s heads for `tp_rank` of `tp_size` (assumes `check_tp` passed)."""
        spec.check_tp(tp_size)
        if tp_size <= spec.num_kv_heads:
            kv = spec.num_kv_heads // tp_size
            return cls(spec.num_heads // tp_size, kv, tp_rank * kv, 1)
        replicas = tp_size // spec.num_kv_heads
        return cls(spec.num_heads // tp_size, 1, tp_rank // replicas, replicas)
