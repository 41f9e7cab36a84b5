"""Write small GGUF files for tests: a Hugging Face checkpoint converted the way llama.cpp's converter does."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file

HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GLOBALS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    """llama.cpp's name for HF tensor `hf`."""
    stem, kind = hf.rsplit(".", 1)
    if stem in GLOBALS:
        return f"{GLOBALS[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[rest]}.{kind}"


def interleave_heads(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: per head, rows of the two rotary halves are interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_params(cfg: dict) -> dict:
    """Rope theta and scaling of a config.json (transformers 5 nests them in `rope_parameters`)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


def llama3_factors(s: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors llama.cpp stores as `rope_freqs` for Llama 3 rope scaling."""
    theta = s["rope_theta"]
    old, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"],
                              s["factor"])
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def add(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: T) -> None:
    """Add one float32 tensor stored as `qtype`."""
    if qtype == T.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == T.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


def write_gguf(model_dir: Path, out: Path, qtype: Callable[[str, np.ndarray], T] = lambda n, a: T.F32,
               extra: dict[str, tuple[np.ndarray, T]] | None = None, arch: str | None = None,
               edit: Callable[[str, np.ndarray], np.ndarray | None] | None = None, rope_freqs: bool = True) -> Path:
    """Convert the HF llama/qwen2 checkpoint in `model_dir` to `out`; `qtype(gguf_name, array)` picks each type.

    `edit(name, array)` may change a tensor or drop it (None); `extra` adds tensors; `arch` overrides the
    architecture; `rope_freqs=False` leaves out Llama 3's frequency factors.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = arch or cfg["model_type"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(out), arch)
    for key, value in [("context_length", cfg["max_position_embeddings"]), ("embedding_length", cfg["hidden_size"]),
                       ("block_count", cfg["num_hidden_layers"]), ("feed_forward_length", cfg["intermediate_size"]),
                       ("attention.head_count", heads), ("attention.head_count_kv", kv),
                       ("rope.dimension_count", head_dim), ("vocab_size", cfg["vocab_size"])]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    rope = rope_params(cfg)
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if cfg.get("eos_token_id") is not None:
        w.add_uint32("tokenizer.ggml.eos_token_id", cfg["eos_token_id"])
    if rope.get("rope_type") == "llama3" and rope_freqs:
        add(w, "rope_freqs.weight", llama3_factors(rope, head_dim), T.F32)
    tensors = {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    for hf, data in sorted(tensors.items()):
        name = gguf_name(hf)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            data = interleave_heads(data, heads if ".attn_q." in name else kv)
        data = edit(name, data) if edit else data
        if data is None:
            continue
        add(w, name, data, qtype(name, data) if data.ndim == 2 else T.F32)
    for name, (data, q) in (extra or {}).items():
        add(w, name, data, q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
