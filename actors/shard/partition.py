"""Which decoder layers each pipeline stage owns: an even split, a cost-balanced one, or the user's own."""
from __future__ import annotations

from collections.abc import Sequence

from actors.shard.spec import ModelSpec

Partition = tuple[int, ...]  # decoder layers per stage, first stage first; sums to num_hidden_layers


def even_partition(num_layers: int, pp: int) -> Partition:
    """Layer counts that differ by at most one, the extra layers on the first stages."""
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if rank < extra else 0) for rank in range(pp))


def layer_macs(spec: ModelSpec) -> int:
    """Weight multiply-adds of one decoder layer per token (q, k, v, o, gate, up, down), whole model."""
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return spec.hidden_size * (2 * q + 2 * kv) + 3 * spec.hidden_size * spec.intermediate_size


def balanced_partition(spec: ModelSpec, pp: int) -> Partition:
    """Layer counts that even out per-stage decode work, counting the LM head as the last stage's extra layers.

    In decode every sequence runs the LM head each step, and its vocab x hidden matmul costs several layers
    (about 4 of them for a 32k vocab at hidden 768), so an even split leaves the last stage the slowest and
    the pipeline runs at its pace. The embedding is a lookup and costs nothing here. Every stage keeps at
    least one layer; among equally good splits the one nearest to even wins.
    """
    layers = spec.num_layers
    if pp == 1:
        return (layers,)
    head = spec.vocab_size * spec.hidden_size / layer_macs(spec)  # the LM head, in layers
    best: tuple[float, float, Partition] | None = None
    for last in range(1, layers - pp + 2):
        front = even_partition(layers - last, pp - 1)
        bottleneck = max(front[0], last + head)
        key = (bottleneck, abs(last - layers / pp), front + (last,))
        best = key if best is None or key[:2] < best[:2] else best
    assert best is not None
    return best[2]


def resolve_partition(spec: ModelSpec, pp: int, how: str | Sequence[int]) -> Partition:
    """'balanced', 'even' or explicit counts -> checked layer counts per stage (ValueError naming the fix)."""
    spec.check_pp(pp)
    if how == "balanced":
        return balanced_partition(spec, pp)
    if how == "even":
        return even_partition(spec.num_layers, pp)
    if isinstance(how, str):
        raise ValueError(f"pipeline_layer_partition={how!r} is not 'balanced', 'even' or a list of layer counts")
    counts = tuple(int(n) for n in how)
    if len(counts) != pp or min(counts) < 1 or sum(counts) != spec.num_layers:
        raise ValueError(f"pipeline_layer_partition={list(counts)} must list {pp} layer counts (one per pipeline "
                         f"stage, each >= 1) that sum to the model's num_hidden_layers={spec.num_layers}, e.g. "
                         f"{list(balanced_partition(spec, pp))}; or use 'balanced' or 'even'")
    return counts


def stage_layers(partition: Sequence[int], pp_rank: int) -> range:
    """The contiguous decoder layers stage `pp_rank` owns under `partition`."""
    start = sum(partition[:pp_rank])
    return range(start, start + partition[pp_rank])
