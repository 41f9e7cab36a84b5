"""Parallelism planner: which (tp, pp) layouts fit a model on a cluster, what each costs per GPU, which to use."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from actors.shard.partition import even_partition, stage_layers
from actors.shard.spec import HeadSplit, ModelSpec

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ClusterShape:
    """The hardware a grid is planned for."""

    nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int
    interconnect: Literal["nvlink", "pcie"] = "nvlink"

    @property
    def gpus(self) -> int:
        """GPUs in the whole cluster."""
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Target:
    """What the replica must hold: context length, concurrent sequences, dtype, usable share of memory."""

    max_model_len: int = 4096
    max_num_seqs: int = 32
    dtype: str = "bfloat16"
    memory_utilization: float = 0.9

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of weights and KV cache."""
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}")
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Candidate:
    """One (tp, pp) the planner weighs, with its per-GPU cost; byte figures are for the fullest rank.

    (`cluster.placement.Layout` is where a chosen grid's workers go; this is only the estimate.)"""

    tp: int
    pp: int
    weight_bytes: int
    kv_bytes: int
    budget_bytes: int
    kv_heads_per_rank: int
    kv_replicas: int
    allreduce_bytes_per_token: int
    replicas: int  # whole grids the cluster holds
    tp_crosses_nodes: bool  # one TP group would need GPUs of more than one node
    tp_across_allowed: bool  # ... and the config allows that (allow_tp_across_nodes)
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        """Weights plus the target's KV cache fit the usable memory of every GPU, and TP stays inside a node
        unless spanning nodes is allowed."""
        memory = self.weight_bytes + self.kv_bytes <= self.budget_bytes
        return memory and (not self.tp_crosses_nodes or self.tp_across_allowed)


def rank_weight_bytes(spec: ModelSpec, tp: int, pp: int, pp_rank: int, dtype_bytes: int) -> int:
    """Parameter bytes one (pp_rank, tp_rank) worker holds, counted the way the stage model allocates them
    (layers split the default, even way)."""
    h, d = spec.hidden_size, spec.head_dim
    split = HeadSplit.of(spec, 0, tp)
    q, kv, inter = split.num_heads * d, split.num_kv_heads * d, spec.intermediate_size // tp
    layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h  # qkv, o, gate/up/down, two norms
    layer += (q + 2 * kv) * spec.qkv_bias + h * spec.o_bias + (2 * inter + h) * spec.mlp_bias
    params = len(stage_layers(even_partition(spec.num_layers, pp), pp_rank)) * layer
    vocab_rows = -(-spec.vocab_size // tp)  # vocab split padded to a multiple of tp
    first, last = pp_rank == 0, pp_rank == pp - 1
    params += vocab_rows * h * first
    if last:
        params += h + vocab_rows * h * (not (spec.tie_word_embeddings and first))  # final norm, LM head
    return params * dtype_bytes


def rank_kv_bytes(spec: ModelSpec, tp: int, pp: int, pp_rank: int, tokens: int, dtype_bytes: int) -> int:
    """KV-cache bytes a worker of stage `pp_rank` needs for `tokens` cached tokens."""
    layers = len(stage_layers(even_partition(spec.num_layers, pp), pp_rank))
    return 2 * layers * HeadSplit.of(spec, 0, tp).num_kv_heads * spec.head_dim * tokens * dtype_bytes


def allreduce_bytes_per_token(spec: ModelSpec, tp: int, pp: int, dtype_bytes: int) -> int:
    """Bytes a rank of the busiest stage sends per token in ring all-reduces (2 per layer + the embedding's)."""
    if tp == 1:
        return 0
    count = 2 * max(even_partition(spec.num_layers, pp)) + 1
    return int(count * spec.hidden_size * dtype_bytes * 2 * (tp - 1) / tp)


def plan(spec: ModelSpec, shape: ClusterShape, target: Target, allow_tp_across_nodes: bool = False) -> list[Candidate]:
    """Every (tp, pp) the model's heads allow within the cluster's GPU count, with cost and notes."""
    b = target.dtype_bytes
    tokens = target.max_model_len * target.max_num_seqs
    budget = int(shape.gpu_memory_bytes * target.memory_utilization)
    out = []
    for tp in spec.valid_tp_sizes(shape.gpus):
        for pp in pipeline_depths(spec, shape, tp):
            split = HeadSplit.of(spec, 0, tp)
            ranks = range(pp)
            layout = Candidate(tp, pp, max(rank_weight_bytes(spec, tp, pp, r, b) for r in ranks),
                               max(rank_kv_bytes(spec, tp, pp, r, tokens, b) for r in ranks), budget,
                               split.num_kv_heads, split.kv_replicas, allreduce_bytes_per_token(spec, tp, pp, b),
                               shape.gpus // (tp * pp), tp > shape.gpus_per_node, allow_tp_across_nodes)
            out.append(replace(layout, notes=tuple(layout_notes(spec, shape, layout))))
    return out


def pipeline_depths(spec: ModelSpec, shape: ClusterShape, tp: int) -> list[int]:
    """pp values worth listing: one stage per node count up to the nodes, then powers of two that fit."""
    most = min(spec.num_layers, shape.gpus // tp)
    candidates = set(range(1, shape.nodes + 1)) | {2**k for k in range(most.bit_length())}
    return sorted(p for p in candidates if p <= most)


def layout_notes(spec: ModelSpec, shape: ClusterShape, layout: Candidate) -> list[str]:
    """Why a layout is risky or ruled out."""
    notes = []
    if layout.tp_crosses_nodes:
        notes.append(f"TP group spans nodes ({layout.tp} > {shape.gpus_per_node} GPUs per node): all-reduce "
                     "over the network" + ("" if layout.tp_across_allowed else "; refused unless "
                                           "allow_tp_across_nodes"))
    if layout.tp > 1 and shape.interconnect == "pcie":
        notes.append("TP over PCIe: all-reduce is slow without NVLink; prefer pp or replicas")
    if layout.kv_replicas > 1:
        notes.append(f"KV heads replicated x{layout.kv_replicas} (tp > {spec.num_kv_heads} KV heads)")
    if layout.pp > 1 and layout.pp > shape.nodes:
        notes.append(f"{math.ceil(layout.pp / shape.nodes)} stages share a node")
    if layout.weight_bytes + layout.kv_bytes > layout.budget_bytes:
        need = (layout.weight_bytes + layout.kv_bytes) / GIB
        notes.append(f"does not fit: needs {need:.1f} GiB per GPU, {layout.budget_bytes / GIB:.1f} GiB usable")
    return notes


def recommend(layouts: list[Candidate], shape: ClusterShape) -> tuple[Candidate | None, str]:
    """The layout to use and why: tp=1 replicas if one GPU holds it, else the least TP in a node, then PP."""
    fitting = [x for x in layouts if x.fits]
    if not fitting:
        return None, "no layout fits: use more or larger GPUs, a shorter max_model_len or fewer concurrent sequences"
    one = next((x for x in fitting if x.tp == 1 and x.pp == 1), None)
    if one is not None:
        return one, (f"the model fits one GPU: run tp=1 and scale out with {one.replicas} replicas; TP would add "
                     "all-reduces without adding memory you need")
    in_node = [x for x in fitting if x.pp == 1]
    if in_node:
        best = min(in_node, key=lambda x: x.tp)
        why = f"tp={best.tp} is the least TP that fits inside one node (TP belongs on NVLink)"
        if shape.interconnect == "pcie":
            why += "; on PCIe compare with a pp layout"
        return best, why + f"; {best.replicas} replicas fit the cluster"
    best = min(fitting, key=lambda x: (x.pp, -x.tp))
    return best, (f"no single node holds the model: tp={best.tp} inside each node, pp={best.pp} stages across "
                  f"nodes (the least pipeline depth that fits)")


def format_plan(spec: ModelSpec, shape: ClusterShape, target: Target, layouts: list[Candidate]) -> str:
    """The planner's table and recommendation as text."""
    rows = [f"model: {spec.family}, {spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_heads} heads, "
            f"{spec.num_kv_heads} KV heads, vocab {spec.vocab_size}; cluster: {shape.nodes} node(s) x "
            f"{shape.gpus_per_node} GPU(s) of {shape.gpu_memory_bytes / GIB:.0f} GiB, {shape.interconnect}; target: "
            f"max_model_len {target.max_model_len} x {target.max_num_seqs} sequences, {target.dtype}",
            "", f"{'tp':>3} {'pp':>3} {'weights GiB':>11} {'KV GiB':>8} {'fits':>4} {'KV heads/rank':>13} "
            f"{'all-reduce KiB/token':>20} {'replicas':>8}  notes"]
    for x in layouts:
        rows.append(f"{x.tp:>3} {x.pp:>3} {x.weight_bytes / GIB:>11.2f} {x.kv_bytes / GIB:>8.2f} "
                    f"{'yes' if x.fits else 'no':>4} {x.kv_heads_per_rank:>13} "
                    f"{x.allreduce_bytes_per_token / 1024:>20.1f} {x.replicas:>8}  {'; '.join(x.notes)}")
    best, why = recommend(layouts, shape)
    rows += ["", f"recommended: tp={best.tp} pp={best.pp} - {why}" if best else f"recommended: none - {why}"]
    return "\n".join(rows)
