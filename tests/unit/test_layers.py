"""Every Megatron-style parallel layer against its plain torch reference at tp=1, 2 and 4."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actors.shard.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from actors.shard.loader import TensorSlice
from actors.shard.spec import HeadSplit, ModelSpec
from actors.shard.tp import TPGroup
from tests.local_grid import ThreadCollectives, ThreadTPGroup

T = TypeVar("T")
DT = torch.float32
ATOL = 1e-5


def run_ranks(tp: int, fn: Callable[[TPGroup], T]) -> list[T]:
    """Run `fn(group)` once per tp rank (threads for tp > 1, since forwards may call collectives)."""
    if tp == 1:
        return [fn(TPGroup.single())]
    shared = ThreadCollectives(tp)
    groups = [ThreadTPGroup(r, shared) for r in range(tp)]
    with ThreadPoolExecutor(tp) as pool:
        return list(pool.map(fn, groups))


def gen(seed: int) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int) -> torch.Tensor:
    """Seeded standard-normal float32 tensor."""
    return torch.randn(*shape, generator=gen(seed), dtype=DT)


def make_spec(heads: int, kv_heads: int, head_dim: int, inter: int = 64) -> ModelSpec:
    """A minimal Llama spec with the given head layout."""
    return ModelSpec.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": heads * head_dim, "intermediate_size": inter,
        "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": 37})


# ----------------------------------------------------------------------------- ColumnParallelLinear

@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_column_parallel_single_part_matches_linear(tp: int, bias: bool) -> None:
    """Concatenated rank outputs equal nn.Linear; each rank holds its contiguous rows."""
    in_f, out_f = 12, 16
    w, b = rand(out_f, in_f, seed=1), rand(out_f, seed=2)
    x = rand(5, in_f, seed=3)
    ref = F.linear(x, w, b if bias else None)

    def rank(g: TPGroup) -> tuple[torch.Tensor, torch.Tensor]:
        layer = ColumnParallelLinear(in_f, [out_f], g, bias, DT)
        layer.weight_loader(layer.weight, TensorSlice(w), "w")
        if bias:
            layer.weight_loader(layer.bias, TensorSlice(b), "b")
        else:
            assert layer.bias is None
        return layer.weight.detach().clone(), layer(x)

    outs = run_ranks(tp, rank)
    rows = out_f // tp
    for r, (weight, _) in enumerate(outs):
        assert weight.shape == (rows, in_f)
        torch.testing.assert_close(weight, w[r * rows:(r + 1) * rows], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([y for _, y in outs], dim=-1), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_column_parallel_merged_gate_up(tp: int, bias: bool) -> None:
    """Merged gate/up: each rank's output is [its gate rows | its up rows] of the separate projections."""
    hidden, inter = 8, 12
    wg, wu = rand(inter, hidden, seed=10), rand(inter, hidden, seed=11)
    bg, bu = rand(inter, seed=12), rand(inter, seed=13)
    x = rand(4, hidden, seed=14)
    gate_ref = F.linear(x, wg, bg if bias else None)
    up_ref = F.linear(x, wu, bu if bias else None)

    def rank(g: TPGroup) -> torch.Tensor:
        layer = ColumnParallelLinear(hidden, [inter, inter], g, bias, DT)
        layer.weight_loader(layer.weight, TensorSlice(wg), "gate_proj.weight", 0)
        layer.weight_loader(layer.weight, TensorSlice(wu), "up_proj.weight", 1)
        if bias:
            layer.weight_loader(layer.bias, TensorSlice(bg), "gate_proj.bias", 0)
            layer.weight_loader(layer.bias, TensorSlice(bu), "up_proj.bias", 1)
        return layer(x)

    outs = run_ranks(tp, rank)
    local = inter // tp
    for r, y in enumerate(outs):
        assert y.shape == (4, 2 * local)
        gate, up = y.chunk(2, dim=-1)
        torch.testing.assert_close(gate, gate_ref[:, r * local:(r + 1) * local], rtol=0, atol=ATOL)
        torch.testing.assert_close(up, up_ref[:, r * local:(r + 1) * local], rtol=0, atol=ATOL)
    # Gathering each part over ranks recovers the whole projection.
    torch.testing.assert_close(torch.cat([y.chunk(2, -1)[0] for y in outs], -1), gate_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.cat([y.chunk(2, -1)[1] for y in outs], -1), up_ref, rtol=0, atol=ATOL)


def test_column_parallel_rejects_indivisible_output() -> None:
    """An output size that does not split over tp is refused at construction."""
    shared = ThreadCollectives(2)
    with pytest.raises(ValueError, match="15"):
        ColumnParallelLinear(4, [15], ThreadTPGroup(0, shared), False, DT)


def test_column_parallel_wrong_shape_names_key() -> None:
    """A checkpoint tensor of the wrong shape raises ValueError naming its key."""
    layer = ColumnParallelLinear(8, [12, 12], TPGroup.single(), True, DT)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        layer.weight_loader(layer.weight, TensorSlice(torch.zeros(12, 9)), "model.layers.3.mlp.up_proj.weight", 1)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.gate_proj\.bias"):
        layer.weight_loader(layer.bias, TensorSlice(torch.zeros(11)), "model.layers.3.mlp.gate_proj.bias", 0)


# ----------------------------------------------------------------------------- QKVParallelLinear

QKV_CASES = [(8, 2, 1), (8, 2, 2), (8, 2, 4), (8, 2, 8), (4, 1, 2), (4, 4, 4)]


@pytest.mark.parametrize("heads,kv_heads,tp", QKV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_parallel_rows_and_outputs(heads: int, kv_heads: int, tp: int, bias: bool) -> None:
    """Each rank holds the right q/k/v rows (KV replicated when tp > kv heads); q concatenates to full q."""
    d = 4
    hidden = heads * d
    spec = make_spec(heads, kv_heads, d)
    wq = rand(heads * d, hidden, seed=20)
    wk, wv = rand(kv_heads * d, hidden, seed=21), rand(kv_heads * d, hidden, seed=22)
    bq, bk, bv = rand(heads * d, seed=23), rand(kv_heads * d, seed=24), rand(kv_heads * d, seed=25)
    x = rand(3, hidden, seed=26)
    q_ref = F.linear(x, wq, bq if bias else None)
    k_ref = F.linear(x, wk, bk if bias else None)
    v_ref = F.linear(x, wv, bv if bias else None)

    def rank(g: TPGroup) -> tuple[HeadSplit, torch.Tensor, torch.Tensor]:
        split = HeadSplit.of(spec, g.rank, g.size)
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, split, g, bias, DT)
        for part, (w, b, name) in enumerate([(wq, bq, "q"), (wk, bk, "k"), (wv, bv, "v")]):
            layer.weight_loader(layer.weight, TensorSlice(w), f"{name}_proj.weight", part)
            if bias:
                layer.weight_loader(layer.bias, TensorSlice(b), f"{name}_proj.bias", part)
        return split, layer.weight.detach().clone(), layer(x)

    outs = run_ranks(tp, rank)
    replicas = max(1, tp // kv_heads)
    local_q = heads // tp * d
    local_kv = max(1, kv_heads // tp) * d
    for r, (split, weight, y) in enumerate(outs):
        assert split.kv_replicas == replicas
        kv_start = r // replicas if tp > kv_heads else r * (kv_heads // tp)
        assert split.kv_head_start == kv_start
        assert weight.shape == (local_q + 2 * local_kv, hidden)
        q_w, k_w, v_w = weight.split([local_q, local_kv, local_kv])
        torch.testing.assert_close(q_w, wq[r * local_q:(r + 1) * local_q], rtol=0, atol=0)
        kv_rows = slice(kv_start * d, kv_start * d + local_kv)
        torch.testing.assert_close(k_w, wk[kv_rows], rtol=0, atol=0)
        torch.testing.assert_close(v_w, wv[kv_rows], rtol=0, atol=0)
        q, k, v = y.split([local_q, local_kv, local_kv], dim=-1)
        torch.testing.assert_close(q, q_ref[:, r * local_q:(r + 1) * local_q], rtol=0, atol=ATOL)
        torch.testing.assert_close(k, k_ref[:, kv_rows], rtol=0, atol=ATOL)
        torch.testing.assert_close(v, v_ref[:, kv_rows], rtol=0, atol=ATOL)
    q_all = torch.cat([y[:, :local_q] for _, _, y in outs], dim=-1)
    torch.testing.assert_close(q_all, q_ref, rtol=0, atol=ATOL)
    # Every checkpoint KV head is held by exactly `replicas` ranks.
    held = [s.kv_head_start + i for s, _, _ in outs for i in range(s.num_kv_heads)]
    assert sorted(held) == sorted(h for h in range(kv_heads) for _ in range(replicas))


def test_qkv_parallel_q_heads_match_kv_groups_under_replication() -> None:
    """At tp=4 with 8 q / 2 kv heads, each rank's query heads belong to the KV head it holds (GQA grouping)."""
    heads, kv_heads, tp = 8, 2, 4
    spec = make_spec(heads, kv_heads, 4)
    group = heads // kv_heads  # query heads per KV head
    for r in range(tp):
        s = HeadSplit.of(spec, r, tp)
        first_q = r * s.num_heads
        assert {(first_q + i) // group for i in range(s.num_heads)} == {s.kv_head_start}


def test_qkv_parallel_wrong_shape_names_key() -> None:
    """A k_proj of the wrong size raises ValueError naming the key."""
    spec = make_spec(8, 2, 4)
    layer = QKVParallelLinear(32, 4, 8, 2, HeadSplit.of(spec, 0, 1), TPGroup.single(), False, DT)
    key = "model.layers.0.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        layer.weight_loader(layer.weight, TensorSlice(torch.zeros(32, 32)), key, 1)


# ----------------------------------------------------------------------------- RowParallelLinear

@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_row_parallel_matches_linear(tp: int, bias: bool) -> None:
    """Partial products summed over ranks plus one bias equal nn.Linear; forward returns that on every rank."""
    in_f, out_f = 16, 6
    ref_layer = nn.Linear(in_f, out_f, bias=bias, dtype=DT)
    with torch.no_grad():
        ref_layer.weight.copy_(rand(out_f, in_f, seed=30))
        if bias:
            ref_layer.bias.copy_(rand(out_f, seed=31) + 5.0)  # large bias: adding it tp times would show
    x = rand(4, in_f, seed=32)
    with torch.no_grad():
        ref = ref_layer(x)
    cols = in_f // tp

    def rank(g: TPGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = RowParallelLinear(in_f, out_f, g, bias, DT)
        layer.weight_loader(layer.weight, TensorSlice(ref_layer.weight.detach()), "o_proj.weight")
        if bias:
            layer.weight_loader(layer.bias, TensorSlice(ref_layer.bias.detach()), "o_proj.bias")
        x_local = x[:, g.rank * cols:(g.rank + 1) * cols]
        partial = F.linear(x_local, layer.weight)
        return layer.weight.detach().clone(), partial, layer(x_local)

    outs = run_ranks(tp, rank)
    for r, (weight, _, y) in enumerate(outs):
        assert weight.shape == (out_f, cols)
        torch.testing.assert_close(weight, ref_layer.weight.detach()[:, r * cols:(r + 1) * cols], rtol=0, atol=0)
        torch.testing.assert_close(y, ref, rtol=0, atol=ATOL)
    summed = sum(p for _, p, _ in outs)
    if bias:
        summed = summed + ref_layer.bias.detach()
    torch.testing.assert_close(summed, ref, rtol=0, atol=ATOL)


def test_row_parallel_wrong_shape_names_key() -> None:
    """A transposed o_proj weight or a wrong-sized bias raises ValueError naming the key."""
    layer = RowParallelLinear(16, 6, TPGroup.single(), True, DT)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        layer.weight_loader(layer.weight, TensorSlice(torch.zeros(16, 6)), "model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.bias"):
        layer.weight_loader(layer.bias, TensorSlice(torch.zeros(16)), "model.layers.1.self_attn.o_proj.bias")


# ----------------------------------------------------------------------------- VocabParallelEmbedding / LM head

@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_embedding_matches_embedding(tp: int) -> None:
    """A 37-token vocab (not divisible by tp) embeds exactly like nn.Embedding on every rank."""
    vocab, hidden = 37, 8
    w = rand(vocab, hidden, seed=40)
    ref = nn.Embedding(vocab, hidden, _weight=w.clone())
    ids = torch.tensor([0, 1, 9, 10, 18, 19, 20, 29, 30, 35, 36, 36, 0])
    with torch.no_grad():
        expected = ref(ids)
    rows = -(-vocab // tp)

    def rank(g: TPGroup) -> tuple[torch.Tensor, torch.Tensor]:
        layer = VocabParallelEmbedding(vocab, hidden, g, DT)
        layer.weight_loader(layer.weight, TensorSlice(w), "model.embed_tokens.weight")
        return layer.weight.detach().clone(), layer(ids)

    outs = run_ranks(tp, rank)
    for r, (weight, y) in enumerate(outs):
        assert weight.shape == (rows, hidden)
        real = w[r * rows:min((r + 1) * rows, vocab)]
        torch.testing.assert_close(weight[:len(real)], real, rtol=0, atol=0)
        assert torch.count_nonzero(weight[len(real):]) == 0  # padding rows stay zero
        torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_vocab_parallel_embedding_wrong_shape_names_key() -> None:
    """An embedding of the wrong vocab size raises ValueError naming the key."""
    layer = VocabParallelEmbedding(37, 8, TPGroup.single(), DT)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight"):
        layer.weight_loader(layer.weight, TensorSlice(torch.zeros(36, 8)), "model.embed_tokens.weight")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parallel_lm_head_matches_matmul(tp: int) -> None:
    """Gathered logits equal x @ W.T trimmed to the real vocab, in float32, on every rank."""
    vocab, hidden = 37, 8
    w = rand(vocab, hidden, seed=50)
    x = rand(5, hidden, seed=51)
    expected = x @ w.T

    def rank(g: TPGroup) -> torch.Tensor:
        layer = ParallelLMHead(vocab, hidden, g, DT)
        layer.weight_loader(layer.weight, TensorSlice(w), "lm_head.weight")
        return layer(x)

    for y in run_ranks(tp, rank):
        assert y.shape == (5, vocab) and y.dtype == torch.float32
        torch.testing.assert_close(y, expected, rtol=0, atol=ATOL)


def test_parallel_lm_head_wrong_shape_names_key() -> None:
    """An lm_head with the wrong hidden size raises ValueError naming the key."""
    layer = ParallelLMHead(37, 8, TPGroup.single(), DT)
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        layer.weight_loader(layer.weight, TensorSlice(torch.zeros(37, 7)), "lm_head.weight")
