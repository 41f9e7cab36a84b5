"""ModelSpec parsing, tp validation and head splits."""
from __future__ import annotations

from typing import Any

import pytest

from actors.shard.spec import HeadSplit, ModelSpec
from tests.configs import hf_config


def spec_of(**overrides: Any) -> ModelSpec:
    """Parse `hf_config(**overrides)`."""
    return ModelSpec.from_hf_dict(hf_config(**overrides))


def test_from_hf_dict_reads_numbers() -> None:
    """The basic architecture numbers come straight from config.json; head_dim is derived."""
    s = spec_of(eos_token_id=[2, 7])
    assert (s.family, s.hidden_size, s.intermediate_size, s.num_layers) == ("llama", 4096, 11008, 32)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (32, 8, 128, 32000)
    assert s.rms_norm_eps == 1e-5 and s.max_position_embeddings == 4096
    assert s.rope_theta == 500000.0 and s.rope_scaling is None
    assert s.eos_token_ids == (2, 7)
    assert (s.qkv_bias, s.o_bias, s.mlp_bias) == (False, False, False)


def test_missing_kv_heads_defaults_to_mha_and_explicit_head_dim_wins() -> None:
    """No num_key_value_heads means one KV head per query head; an explicit head_dim overrides hidden/heads."""
    cfg = hf_config(head_dim=64)
    del cfg["num_key_value_heads"]
    s = ModelSpec.from_hf_dict(cfg)
    assert s.num_kv_heads == 32 and s.head_dim == 64


def test_valid_tp_sizes_gqa_includes_kv_replication() -> None:
    """32 query / 8 KV heads: tp 1..8 split KV heads, 16 and 32 replicate them."""
    s = spec_of()
    assert s.valid_tp_sizes() == [1, 2, 4, 8, 16, 32]
    for tp in (1, 2, 4, 8, 16, 32):
        s.check_tp(tp)


@pytest.mark.parametrize("tp,replicas", [(16, 2), (32, 4)])
def test_head_split_replicates_kv_heads(tp: int, replicas: int) -> None:
    """tp > KV heads: one KV head per rank, `replicas` ranks share it, kv_head_start = rank // replicas."""
    s = spec_of()
    splits = [HeadSplit.of(s, r, tp) for r in range(tp)]
    for r, split in enumerate(splits):
        assert split.num_heads == 32 // tp
        assert split.num_kv_heads == 1
        assert split.kv_replicas == replicas
        assert split.kv_head_start == r // replicas
    assert sorted({x.kv_head_start for x in splits}) == list(range(8))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_head_split_partitions_kv_heads(tp: int) -> None:
    """tp <= KV heads: ranks hold disjoint, contiguous KV-head groups covering all 8."""
    s = spec_of()
    held: list[int] = []
    for r in range(tp):
        split = HeadSplit.of(s, r, tp)
        assert (split.num_heads, split.num_kv_heads, split.kv_replicas) == (32 // tp, 8 // tp, 1)
        assert split.kv_head_start == r * (8 // tp)
        held += range(split.kv_head_start, split.kv_head_start + split.num_kv_heads)
    assert held == list(range(8))


@pytest.mark.parametrize("tp", [3, 12, 0, 64])
def test_check_tp_rejects_with_head_counts_and_valid_list(tp: int) -> None:
    """An unfit tp raises ValueError naming both head counts and the valid values."""
    s = spec_of()
    with pytest.raises(ValueError) as err:
        s.check_tp(tp)
    msg = str(err.value)
    assert f"tensor_parallel_size={tp}" in msg
    assert "num_attention_heads=32" in msg
    assert "num_key_value_heads=8" in msg
    assert "[1, 2, 4, 8, 16, 32]" in msg


def test_head_split_refuses_bad_tp() -> None:
    """HeadSplit.of validates tp itself."""
    with pytest.raises(ValueError, match="num_key_value_heads=8"):
        HeadSplit.of(spec_of(), 0, 12)


def test_tp_must_divide_intermediate_size() -> None:
    """A tp that splits the heads but not the MLP is refused, naming intermediate_size."""
    s = spec_of(intermediate_size=11000)  # 11000 = 8 * 1375: tp 16 and 32 do not divide it
    assert s.valid_tp_sizes() == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="intermediate_size"):
        s.check_tp(16)


def test_tp_between_kv_heads_must_be_their_multiple() -> None:
    """With 12 query / 4 KV heads, tp=6 splits the queries but cannot replicate 4 KV heads evenly."""
    s = spec_of(num_attention_heads=12, num_key_value_heads=4, hidden_size=768, intermediate_size=3072)
    assert s.valid_tp_sizes() == [1, 2, 4, 12]
    with pytest.raises(ValueError, match=r"\[1, 2, 4, 12\]"):
        s.check_tp(6)


def test_mqa_any_tp_dividing_heads_is_valid() -> None:
    """One KV head (MQA): every divisor of the query heads is a valid tp, with the KV head replicated."""
    s = spec_of(num_key_value_heads=1, intermediate_size=4096 * 4)
    assert s.valid_tp_sizes() == [1, 2, 4, 8, 16, 32]
    for tp in (2, 32):
        split = HeadSplit.of(s, tp - 1, tp)
        assert (split.num_kv_heads, split.kv_head_start, split.kv_replicas) == (1, 0, tp)


def test_valid_tp_sizes_respects_limit() -> None:
    """`limit` caps the search."""
    assert spec_of().valid_tp_sizes(limit=8) == [1, 2, 4, 8]


def test_check_pp_bounds() -> None:
    """pp must be between 1 and the layer count."""
    s = spec_of(num_hidden_layers=4)
    s.check_pp(1)
    s.check_pp(4)
    for pp in (0, 5):
        with pytest.raises(ValueError, match="num_hidden_layers=4"):
            s.check_pp(pp)


def test_unsupported_architecture_named() -> None:
    """An architecture we do not implement is refused by name."""
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelSpec.from_hf_dict(hf_config(arch="GPT2LMHeadModel"))
    cfg = hf_config()
    del cfg["architectures"]
    with pytest.raises(ValueError, match="not supported"):
        ModelSpec.from_hf_dict(cfg)


def test_supported_families() -> None:
    """Each supported architecture maps to its family."""
    for arch, fam in [("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "mistral"),
                      ("Qwen2ForCausalLM", "qwen2")]:
        assert spec_of(arch=arch).family == fam


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_rope_parameters_v5_default() -> None:
    """transformers v5 `rope_parameters` with rope_type default: theta read from it, no scaling."""
    cfg = hf_config(rope_parameters={"rope_type": "default", "rope_theta": 12345.0})
    del cfg["rope_theta"]
    s = ModelSpec.from_hf_dict(cfg)
    assert s.rope_theta == 12345.0 and s.rope_scaling is None


def test_rope_parameters_v5_llama3() -> None:
    """v5 llama3 rope_parameters keep the scaling numbers (without theta) and read theta from the dict."""
    cfg = hf_config(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3})
    del cfg["rope_theta"]
    s = ModelSpec.from_hf_dict(cfg)
    assert s.rope_theta == 500000.0
    assert s.rope_scaling == {"rope_type": "llama3", **LLAMA3}
    assert cfg["rope_parameters"]["rope_theta"] == 500000.0  # the caller's dict is left untouched


def test_legacy_rope_scaling_and_theta() -> None:
    """Legacy rope_scaling (`type` or `rope_type`) plus top-level rope_theta parse the same way."""
    for type_key in ("type", "rope_type"):
        s = spec_of(rope_theta=500000.0, rope_scaling={type_key: "llama3", **LLAMA3})
        assert s.rope_theta == 500000.0
        assert s.rope_scaling is not None and s.rope_scaling["factor"] == 8.0
        assert s.rope_scaling[type_key] == "llama3"
        assert s.rope_scaling["original_max_position_embeddings"] == 8192


def test_rope_theta_default_and_legacy_top_level() -> None:
    """No rope info at all means theta 10000; a top-level rope_theta alone is honoured."""
    cfg = hf_config()
    del cfg["rope_theta"]
    assert ModelSpec.from_hf_dict(cfg).rope_theta == 10000.0
    assert spec_of(rope_theta=1e6).rope_theta == 1e6


def test_unsupported_rope_type_named() -> None:
    """A rope type we do not implement is refused by name."""
    with pytest.raises(ValueError, match="yarn"):
        spec_of(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_qwen2_biases_and_window() -> None:
    """Qwen2 biases q/k/v but not o; its sliding window applies only with use_sliding_window."""
    s = spec_of(arch="Qwen2ForCausalLM", sliding_window=4096)
    assert (s.qkv_bias, s.o_bias, s.mlp_bias) == (True, False, False)
    assert s.sliding_window is None
    assert spec_of(arch="Qwen2ForCausalLM", sliding_window=4096, use_sliding_window=True).sliding_window == 4096
    odd = spec_of(arch="Qwen2ForCausalLM", attention_bias=True, mlp_bias=True)  # keys Qwen2 itself ignores
    assert (odd.qkv_bias, odd.o_bias, odd.mlp_bias) == (True, False, False)


def test_llama_attention_and_mlp_bias_flags() -> None:
    """Llama biases q/k/v/o with attention_bias and the MLP with mlp_bias; Mistral never does."""
    s = spec_of(attention_bias=True, mlp_bias=True)
    assert (s.qkv_bias, s.o_bias, s.mlp_bias) == (True, True, True)
    m = spec_of(arch="MistralForCausalLM", attention_bias=True, mlp_bias=True, sliding_window=16)
    assert (m.qkv_bias, m.o_bias, m.mlp_bias) == (False, False, False)
    assert m.sliding_window == 16


def test_torch_dtype_override_and_unknown() -> None:
    """The checkpoint dtype is used unless overridden; an unknown name is refused."""
    import torch

    s = spec_of(torch_dtype="bfloat16")
    assert s.torch_dtype() == torch.bfloat16
    assert s.torch_dtype("float32") == torch.float32
    with pytest.raises(ValueError, match="int8"):
        s.torch_dtype("int8")
