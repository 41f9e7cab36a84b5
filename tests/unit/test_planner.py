"""Planner figures against hand-computed values for Llama-3-70B- and 13B-shaped models on 8 x 80 GiB nodes."""
from __future__ import annotations

import pytest

from actors.shard.spec import ModelSpec
from cluster.planner import GIB, ClusterShape, Target, format_plan, plan, recommend


def spec(layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int) -> ModelSpec:
    """A Llama-architecture spec of the given shape."""
    return ModelSpec.from_hf_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
                                   "intermediate_size": inter, "num_hidden_layers": layers,
                                   "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
                                   "torch_dtype": "bfloat16"})


LLAMA_70B = spec(80, 8192, 64, 8, 28672, 128256)
LLAMA_13B = spec(40, 5120, 40, 40, 13824, 32000)
NODE = dict(gpus_per_node=8, gpu_memory_bytes=80 * GIB, interconnect="nvlink")


def test_70b_on_two_nvlink_nodes() -> None:
    """tp=4 and tp=8 fit one node (8: one KV head per rank); tp=2 does not; tp=16 spans nodes and is flagged."""
    layouts = {(x.tp, x.pp): x for x in plan(LLAMA_70B, ClusterShape(nodes=2, **NODE),
                                              Target(max_model_len=8192, max_num_seqs=32))}
    t8, t4 = layouts[(8, 1)], layouts[(4, 1)]
    # By hand: per layer at tp=8, 8192*(1024+2*128) + 1024*8192 + 3*8192*3584 + 2*8192 = 106,971,136 params;
    # x80 layers + 2 x 16,032 vocab rows x 8192 (embedding, LM head) + 8192 (norm) = 8,820,367,360 params, bf16.
    assert t8.weight_bytes == 8_820_367_360 * 2
    assert t4.weight_bytes == 17_639_415_808 * 2
    # KV per token: 2 (k, v) x 80 layers x KV heads per rank x 128 x 2 bytes; 8192 x 32 tokens.
    assert t8.kv_bytes == 2 * 80 * 1 * 128 * 2 * 8192 * 32 == 10 * GIB
    assert t4.kv_bytes == 20 * GIB
    assert t8.fits and t4.fits and not layouts[(2, 1)].fits and not layouts[(1, 1)].fits
    assert t8.kv_heads_per_rank == 1 and t8.kv_replicas == 1 and t4.kv_heads_per_rank == 2
    # Ring all-reduce: (2 per layer + embedding) x hidden x 2 bytes x 2(tp-1)/tp.
    assert t8.allreduce_bytes_per_token == int(161 * 8192 * 2 * 2 * 7 / 8)
    t16 = layouts[(16, 1)]
    assert t16.tp_crosses_nodes and not t16.fits and t16.kv_replicas == 2
    assert any("spans nodes" in n for n in t16.notes) and any("replicated x2" in n for n in t16.notes)
    allowed = {(x.tp, x.pp): x for x in plan(LLAMA_70B, ClusterShape(nodes=2, **NODE),
                                             Target(max_model_len=8192, max_num_seqs=32), allow_tp_across_nodes=True)}
    assert allowed[(16, 1)].fits and not any("refused" in n for n in allowed[(16, 1)].notes)
    best, why = recommend(list(layouts.values()), ClusterShape(nodes=2, **NODE))
    assert (best.tp, best.pp) == (4, 1) and "inside one node" in why and best.replicas == 4


def test_13b_fits_one_gpu_so_tp1_with_replicas() -> None:
    """A model that fits one GPU gets tp=1 and as many replicas as GPUs."""
    shape = ClusterShape(nodes=1, **NODE)
    layouts = plan(LLAMA_13B, shape, Target(max_model_len=4096, max_num_seqs=8))
    best, why = recommend(layouts, shape)
    assert (best.tp, best.pp, best.replicas) == (1, 1, 8) and "replicas" in why
    assert 24 * GIB < best.weight_bytes < 25 * GIB and best.kv_bytes == 2 * 40 * 40 * 128 * 2 * 4096 * 8


def test_pcie_and_no_fit_are_explained() -> None:
    """TP over PCIe is warned about; an impossible target says what to change."""
    shape = ClusterShape(nodes=1, gpus_per_node=2, gpu_memory_bytes=24 * GIB, interconnect="pcie")
    layouts = plan(LLAMA_70B, shape, Target())
    assert all("PCIe" in " ".join(x.notes) for x in layouts if x.tp > 1)
    best, why = recommend(layouts, shape)
    assert best is None and "no layout fits" in why
    assert "recommended: none" in format_plan(LLAMA_70B, shape, Target(), layouts)


def test_bad_dtype_is_a_clear_error() -> None:
    """An unknown dtype names the valid ones."""
    with pytest.raises(ValueError, match="bfloat16"):
        plan(LLAMA_13B, ClusterShape(nodes=1, **NODE), Target(dtype="int3"))
