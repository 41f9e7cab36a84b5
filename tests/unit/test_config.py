"""GridServeConfig validation against the model's config.json, and the driver's KV BlockManager."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cluster.blocks import BlockManager
from cluster.config import GridServeConfig
from deployments.make_model import write_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (4 heads, 2 KV heads, 2 layers, 512 positions) without a tokenizer."""
    return write_model(tmp_path_factory.mktemp("cfg") / "tiny-test", "llama", tokenizer=False, **TINY)


def make(model_dir: Path, **kw: Any) -> GridServeConfig:
    """A config for `model_dir` with sizes that fit the tiny model, plus overrides."""
    args: dict[str, Any] = dict(model=str(model_dir), max_model_len=256, max_num_batched_tokens=512)
    args.update(kw)
    return GridServeConfig(**args)


def test_valid_config_and_derived_fields(model_dir: Path) -> None:
    """A fitting config validates; world size, name and dtype are derived from it."""
    cfg = make(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2, dtype="bfloat16")
    assert cfg.world_size == 4
    assert cfg.model_name == "tiny-test"
    assert cfg.torch_dtype_name == "bfloat16"
    assert make(model_dir).torch_dtype_name is None
    assert make(model_dir, served_model_name="x").model_name == "x"
    assert cfg.spec().num_heads == 4


def test_unknown_field_named(model_dir: Path) -> None:
    """An unknown field raises ValidationError naming it (extra='forbid')."""
    with pytest.raises(ValidationError) as err:
        make(model_dir, tensor_paralel_size=2)
    assert "tensor_paralel_size" in str(err.value)


def test_config_is_frozen(model_dir: Path) -> None:
    """Fields cannot be reassigned after validation."""
    cfg = make(model_dir)
    with pytest.raises(ValidationError):
        cfg.tensor_parallel_size = 3  # type: ignore[misc]


@pytest.mark.parametrize("tp", [3, 8])
def test_tp_not_fitting_heads_lists_valid_values(model_dir: Path, tp: int) -> None:
    """A tp that cannot split 4 query / 2 KV heads raises, listing the valid tp values."""
    with pytest.raises(ValidationError) as err:
        make(model_dir, tensor_parallel_size=tp)
    msg = str(err.value)
    assert f"tensor_parallel_size={tp}" in msg
    assert "num_attention_heads=4" in msg and "num_key_value_heads=2" in msg
    assert "[1, 2, 4]" in msg


def test_pp_beyond_layers_refused(model_dir: Path) -> None:
    """More pipeline stages than layers raises, naming the layer count."""
    with pytest.raises(ValidationError, match="num_hidden_layers=2"):
        make(model_dir, pipeline_parallel_size=3)


def test_batched_tokens_below_max_num_seqs_refused(model_dir: Path) -> None:
    """max_num_batched_tokens < max_num_seqs raises, naming both; below max_model_len is fine (chunked prefill)."""
    with pytest.raises(ValidationError) as err:
        make(model_dir, max_num_seqs=64, max_num_batched_tokens=63)
    assert "max_num_batched_tokens=63" in str(err.value) and "max_num_seqs=64" in str(err.value)
    make(model_dir, max_num_seqs=64, max_num_batched_tokens=64)  # equal is fine
    make(model_dir, max_model_len=256, max_num_batched_tokens=100)  # prompts longer than a step go in chunks
    assert GridServeConfig(model=str(model_dir), max_num_seqs=4096).max_num_batched_tokens == 4096


def test_model_len_beyond_positions_refused(model_dir: Path) -> None:
    """max_model_len > max_position_embeddings raises, naming the model's limit."""
    with pytest.raises(ValidationError) as err:
        make(model_dir, max_model_len=513, max_num_batched_tokens=1024)
    assert "max_position_embeddings=512" in str(err.value)
    make(model_dir, max_model_len=512, max_num_batched_tokens=1024)


def test_missing_model_dir_mentions_config_json(tmp_path: Path) -> None:
    """A model folder without config.json raises, naming config.json."""
    with pytest.raises(ValidationError, match="config.json"):
        GridServeConfig(model=str(tmp_path / "no-such-model"))
    with pytest.raises(ValidationError, match="config.json"):
        GridServeConfig(model=str(tmp_path))  # exists but empty


@pytest.mark.parametrize("field,value", [("tensor_parallel_size", 0), ("block_size", 0), ("max_model_len", 1),
                                         ("gpu_memory_utilization", 1.5), ("dtype", "int8"), ("device", "tpu")])
def test_field_bounds(model_dir: Path, field: str, value: Any) -> None:
    """Out-of-range or unknown-choice values raise ValidationError naming the field."""
    with pytest.raises(ValidationError) as err:
        make(model_dir, **{field: value})
    assert field in str(err.value)


# ----------------------------------------------------------------------------- BlockManager

def test_block_manager_grow_and_release() -> None:
    """grow appends just enough blocks, release returns them; usage tracks the share in use."""
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.usage == 0.0
    assert bm.blocks_for(0) == 0 and bm.blocks_for(1) == 1 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    a: list[int] = []
    assert bm.can_grow(a, 5)
    bm.grow(a, 5)
    assert len(a) == 2 and bm.usage == 0.5
    bm.grow(a, 8)  # still fits in 2 blocks
    assert len(a) == 2
    b: list[int] = []
    bm.grow(b, 1)
    assert len(b) == 1 and bm.usage == 0.75
    assert set(a).isdisjoint(b) and set(a) | set(b) <= set(range(4))
    assert bm.can_grow(b, 8) and not bm.can_grow(b, 9)
    assert not bm.can_grow([], 8)
    bm.release(a)
    assert a == [] and bm.usage == 0.25
    assert bm.can_grow(b, 16) and not bm.can_grow(b, 17)
    bm.grow(b, 12)
    assert len(b) == 3 and len(set(b)) == 3 and bm.usage == 0.75
    bm.release(b)
    assert bm.usage == 0.0 and sorted(bm.free) == [0, 1, 2, 3]


def test_block_manager_full_usage() -> None:
    """Every block handed out means usage 1.0 and no further growth."""
    bm = BlockManager(num_blocks=3, block_size=2)
    t: list[int] = []
    bm.grow(t, 6)
    assert bm.usage == 1.0 and sorted(t) == [0, 1, 2]
    assert bm.can_grow(t, 6) and not bm.can_grow(t, 7) and not bm.can_grow([], 1)


@pytest.mark.parametrize("n", [0, -1])
def test_block_manager_needs_a_block(n: int) -> None:
    """num_blocks < 1 raises ValueError naming num_blocks."""
    with pytest.raises(ValueError, match=f"num_blocks={n}"):
        BlockManager(num_blocks=n, block_size=16)


# ----------------------------------------------------------------------------- lengths the model decides

def test_model_len_defaults_to_the_models_context(model_dir: Path) -> None:
    """Unset max_model_len is the model's context length; the step budget stays 2048 (prompts go in chunks)."""
    cfg = GridServeConfig(model=str(model_dir))
    assert cfg.max_model_len == 512 and cfg.max_num_batched_tokens == 2048
    assert GridServeConfig(model=str(model_dir), max_model_len=100).max_num_batched_tokens == 2048


def test_smallest_context_key_wins() -> None:
    """A config giving several context keys (n_positions, seq_length, ...) is limited by the smallest."""
    from actors.shard.spec import ModelSpec
    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, vocab_size=96, max_position_embeddings=4096, seq_length=1024)
    assert ModelSpec.from_hf_dict(hf).max_position_embeddings == 1024


def test_kv_cache_caps_a_derived_length_only(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A derived max_model_len shrinks to what the KV cache holds (logged); an explicit one too long is an error."""
    derived = GridServeConfig(model=str(model_dir))
    with caplog.at_level("INFO", logger="gridserve"):
        fitted = derived.fit_kv_cache(300)
    assert fitted.max_model_len == 300 and "capped by the KV cache" in caplog.text
    assert fitted.fit_kv_cache(300) is fitted and derived.fit_kv_cache(600) is derived
    explicit = make(model_dir, max_model_len=256)
    assert explicit.fit_kv_cache(256) is explicit
    with pytest.raises(ValueError, match="max_model_len=256 but the KV cache holds only 200 tokens"):
        explicit.fit_kv_cache(200)


def test_from_args_one_readable_line_per_problem(model_dir: Path) -> None:
    """from_args turns pydantic's dump into one line per problem: field, value, why; no docs URLs."""
    from cluster.config import ConfigError
    with pytest.raises(ConfigError) as err:
        GridServeConfig.from_args(dict(model=str(model_dir), tensor_parallel_size="two", max_modle_len=5,
                                       api_key=["secret"]))
    lines = str(err.value).splitlines()
    assert len(lines) == 4 and "errors.pydantic.dev" not in str(err.value) and "secret" not in str(err.value)
    assert any(line.strip().startswith("- tensor_parallel_size='two':") for line in lines)
    assert any("unknown setting 'max_modle_len'" in line and "max_model_len" in line for line in lines)
    with pytest.raises(ConfigError, match="max_model_len=1024 exceeds the model's context length.*=512"):
        GridServeConfig.from_args(dict(model=str(model_dir), max_model_len=1024))
    with pytest.raises(ConfigError) as err:  # every problem with the model at once, not only the first
        GridServeConfig.from_args(dict(model=str(model_dir), max_model_len=1024, tensor_parallel_size=3))
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 2 and "tensor_parallel_size=3" in lines[0] and "max_model_len=1024" in lines[1]
