"""HF config.json contents the tests build small random checkpoints and model specs from."""
from __future__ import annotations

from typing import Any

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=256)
# name -> (family, HF config overrides): GQA + Llama 3 rope scaling, Qwen2 with QKV bias, tied MQA, Mistral window.
VARIANTS = {
    "llama_gqa": ("llama", dict(SMALL, num_key_value_heads=2, vocab_size=96,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2_bias": ("qwen2", dict(SMALL, num_key_value_heads=2, vocab_size=101)),
    "llama_tied_mqa": ("llama", dict(SMALL, num_key_value_heads=1, vocab_size=90, tie_word_embeddings=True)),
    "mistral_window": ("mistral", dict(SMALL, num_key_value_heads=2, vocab_size=96, head_dim=16, sliding_window=12)),
}


def hf_config(arch: str = "LlamaForCausalLM", **overrides: Any) -> dict[str, Any]:
    """A Llama-7B-shaped config.json dict (32 heads, 8 KV heads), with overrides."""
    cfg: dict[str, Any] = {
        "architectures": [arch], "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    }
    cfg.update(overrides)
    return cfg
