"""Pipeline layer partitions: even, cost-balanced (the LM head counts as layers), and user-given counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from actors.shard.partition import balanced_partition, even_partition, layer_macs, resolve_partition, stage_layers
from actors.shard.spec import ModelSpec
from cluster.config import GridServeConfig
from tests.configs import hf_config

BENCH_125M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000)


def spec_of(**fields: int) -> ModelSpec:
    """A Llama spec with the given sizes."""
    return ModelSpec.from_hf_dict(hf_config(**fields))


def bottleneck(spec: ModelSpec, partition: tuple[int, ...]) -> float:
    """The slowest stage's decode work in layers (the last stage also runs the LM head)."""
    head = spec.vocab_size * spec.hidden_size / layer_macs(spec)
    return max(n + head * (i == len(partition) - 1) for i, n in enumerate(partition))


def test_even_partition_puts_extra_layers_first() -> None:
    """10 layers over 3 stages: 4, 3, 3, contiguous and covering every layer once."""
    partition = even_partition(10, 3)
    assert partition == (4, 3, 3)
    assert [list(stage_layers(partition, r)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


@pytest.mark.parametrize("layers,pp", [(4, 1), (4, 4), (7, 2), (32, 5), (5, 3), (12, 2), (80, 8)])
def test_balanced_covers_layers_and_never_loses_to_even(layers: int, pp: int) -> None:
    """Balanced stages are contiguous, non-empty, cover all layers, and their slowest stage is no slower."""
    spec = spec_of(**{**BENCH_125M, "num_hidden_layers": layers})
    partition = balanced_partition(spec, pp)
    ranges = [stage_layers(partition, r) for r in range(pp)]
    assert [i for r in ranges for i in r] == list(range(layers)) and min(partition) >= 1
    assert bottleneck(spec, partition) <= bottleneck(spec, even_partition(layers, pp))


def test_balanced_moves_layers_off_the_lm_head_stage() -> None:
    """bench-125m's LM head costs ~3.9 layers: pp=2 takes 8 + 4 layers, the slowest stage 8 layers, not 9.9."""
    spec = spec_of(**BENCH_125M)
    assert balanced_partition(spec, 2) == (8, 4)
    assert bottleneck(spec, (8, 4)) == 8 and bottleneck(spec, (6, 6)) > 9.9
    assert balanced_partition(spec, 1) == (12,)
    assert balanced_partition(spec, 12) == (1,) * 12


def test_balanced_is_even_when_the_head_is_cheap() -> None:
    """A tiny vocabulary adds next to nothing: the split stays even."""
    assert balanced_partition(spec_of(**{**BENCH_125M, "vocab_size": 64}), 3) == (4, 4, 4)


@pytest.mark.parametrize("counts", [[6, 5], [6, 6, 0], [13, -1], [12]])
def test_bad_counts_name_the_field_and_a_valid_split(counts: list[int]) -> None:
    """Counts that do not sum to the layers, miss a stage or leave one empty are refused with the fix."""
    fix = r"pipeline_layer_partition=.*sum to the model's num_hidden_layers=12.*\[8, 4\]"
    with pytest.raises(ValueError, match=fix):
        resolve_partition(spec_of(**BENCH_125M), 2, counts)


def test_config_resolves_and_validates_the_partition(tmp_path: Path) -> None:
    """GridServeConfig turns 'balanced', 'even' or a list into counts, and rejects a bad list at load time."""
    model = tmp_path / "m"  # the config only reads config.json
    model.mkdir()
    (model / "config.json").write_text(json.dumps(hf_config(**{**BENCH_125M, "num_hidden_layers": 4})))
    assert GridServeConfig(model=str(model), pipeline_parallel_size=2).layer_partition() == (2, 2)
    assert GridServeConfig(model=str(model), pipeline_parallel_size=2,
                           pipeline_layer_partition="balanced").layer_partition() == (3, 1)
    assert GridServeConfig(model=str(model), pipeline_parallel_size=2,
                           pipeline_layer_partition="even").layer_partition() == (2, 2)
    assert GridServeConfig(model=str(model), pipeline_parallel_size=2,
                           pipeline_layer_partition=[1, 3]).layer_partition() == (1, 3)
    with pytest.raises(ValidationError, match="pipeline_layer_partition"):
        GridServeConfig(model=str(model), pipeline_parallel_size=2, pipeline_layer_partition=[2, 3])
    with pytest.raises(ValidationError, match="pipeline_layer_partition"):
        GridServeConfig(model=str(model), pipeline_parallel_size=2, pipeline_layer_partition="fast")
