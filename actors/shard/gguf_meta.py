"""A GGUF file's metadata as the architecture numbers of a `ModelSpec` (what config.json gives for HF folders)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader

from actors.shard.spec import ModelSpec

FAMILIES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF general.architecture -> our family
MISSING = object()


def field(reader: GGUFReader, key: str, default: Any = MISSING) -> Any:
    """Value of metadata `key` (a Python scalar, string or list); `default` if absent, else ValueError."""
    f = reader.fields.get(key)
    if f is None:
        if default is MISSING:
            raise ValueError(f"GGUF metadata lacks {key!r}, which gridserve needs to build the model")
        return default
    return f.contents()


def same_for_all_layers(key: str, value: Any) -> int:
    """A per-model count; GGUF may store it per layer, which we accept only when every layer agrees."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF metadata {key!r} differs between layers ({sorted(set(value))}); gridserve "
                             "needs the same value in every layer")
        return int(value[0])
    return int(value)


def rope_scaling(reader: GGUFReader, arch: str, head_dim: int) -> dict[str, Any] | None:
    """Rope frequency factors from the `rope_freqs` tensor (Llama 3 files); other scaling types are refused."""
    kind = field(reader, f"{arch}.rope.scaling.type", "none")
    if kind != "none":
        raise ValueError(f"GGUF metadata {arch}.rope.scaling.type={kind!r} is not supported; supported: 'none' "
                         "(Llama 3 scaling comes as the rope_freqs tensor, which is)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    factors = [float(x) for x in freqs.data.reshape(-1).astype("float32")]
    if len(factors) != head_dim // 2:
        raise ValueError(f"GGUF tensor 'rope_freqs.weight' has {len(factors)} factors, expected head_dim / 2 = "
                         f"{head_dim // 2}")
    return {"rope_type": "freq_factors", "factors": tuple(factors)}


def eos_ids(reader: GGUFReader) -> tuple[int, ...]:
    """End-of-sequence and end-of-turn token ids the file names (a chat model stops at either)."""
    ids = [field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot")]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def read_spec(reader: GGUFReader, path: Path) -> ModelSpec:
    """The `ModelSpec` of a parsed GGUF file; unsupported architectures fail naming them."""
    arch = field(reader, "general.architecture")
    if arch not in FAMILIES:
        raise ValueError(f"model: {path} has GGUF architecture {arch!r}, which gridserve does not support; "
                         f"supported: {sorted(FAMILIES)}")
    if int(field(reader, "split.count", 1)) > 1:
        raise ValueError(f"model: {path} is one part of a split GGUF; merge the parts with llama.cpp's "
                         "llama-gguf-split --merge and point `model` at the merged file")
    family = FAMILIES[arch]
    names = {t.name for t in reader.tensors}
    hidden = int(field(reader, f"{arch}.embedding_length"))
    heads = same_for_all_layers("head_count", field(reader, f"{arch}.attention.head_count"))
    kv_heads = same_for_all_layers("head_count_kv", field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(field(reader, f"{arch}.attention.key_length", hidden // heads))
    rot = int(field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"GGUF metadata {arch}.rope.dimension_count={rot} != head_dim={head_dim}: partial "
                         "rotary embeddings are not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = field(reader, f"{arch}.vocab_size", None) or (int(embd.shape[1]) if embd is not None else None)
    if vocab is None:
        raise ValueError(f"model: {path} has neither {arch}.vocab_size nor a token_embd.weight tensor")
    return ModelSpec(
        family=family, hidden_size=hidden,
        intermediate_size=same_for_all_layers("feed_forward_length", field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(field(reader, f"{arch}.block_count")), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=int(vocab),
        rms_norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling(reader, arch, head_dim),
        max_position_embeddings=int(field(reader, f"{arch}.context_length")),
        tie_word_embeddings="output.weight" not in names,
        # Qwen2 always biases q/k/v; a llama file has whichever biases it carries.
        qkv_bias=family == "qwen2" or "blk.0.attn_q.bias" in names,
        o_bias=family == "llama" and "blk.0.attn_output.bias" in names,
        mlp_bias=family == "llama" and "blk.0.ffn_gate.bias" in names,
        sliding_window=None,
        # Blocks decode to float32 exactly (f16 scales times small integers), and HF's GGUF load keeps float32.
        dtype="float32",
        eos_token_ids=eos_ids(reader),
    )
