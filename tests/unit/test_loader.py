"""Safetensors loading: single and sharded files, per-rank slice reads, key/shape checks, pipeline stages."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.shard.layers import LazySlice
from actors.shard.loader import CheckpointReader, load_stage
from actors.shard.model import StageModel
from actors.shard.partition import even_partition
from actors.shard.spec import ModelSpec
from actors.shard.tp import TPGroup
from deployments.make_model import write_model
from tests.local_grid import ThreadCollectives, ThreadTPGroup

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=256)
MAX_LEN = 64


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint in one model.safetensors."""
    return write_model(tmp_path_factory.mktemp("single"), "llama", seed=3, tokenizer=False, **TINY)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint (same seed) split into several files with an index."""
    return write_model(tmp_path_factory.mktemp("sharded"), "llama", seed=3, tokenizer=False,
                       max_shard_size="50KB", **TINY)


@pytest.fixture
def copy_dir(single_dir: Path, tmp_path: Path) -> Path:
    """A private, editable copy of the single-file checkpoint."""
    return Path(shutil.copytree(single_dir, tmp_path / "model"))


def build(model_dir: Path, tp: TPGroup | None = None, pp_rank: int = 0, pp_size: int = 1) -> StageModel:
    """An unloaded fp32 CPU StageModel for one grid position."""
    spec = ModelSpec.from_dir(model_dir)
    return StageModel(spec, tp or TPGroup.single(), pp_rank, even_partition(spec.num_layers, pp_size), torch.float32,
                      MAX_LEN, torch.device("cpu"))


def load(model_dir: Path, tp: TPGroup | None = None, pp_rank: int = 0, pp_size: int = 1,
         wrap: Callable[[Callable[[str], LazySlice]], Callable[[str], LazySlice]] | None = None) -> StageModel:
    """Build and load one shard from `model_dir`, optionally wrapping the slice getter."""
    model = build(model_dir, tp, pp_rank, pp_size)
    reader = CheckpointReader(model_dir)
    get = reader.get_slice if wrap is None else wrap(reader.get_slice)
    load_stage(model, reader.keys(), get, model.spec)
    return model


def params(model: StageModel) -> dict[str, torch.Tensor]:
    """Parameter name -> detached tensor."""
    return {k: v.detach() for k, v in model.named_parameters()}


def rewrite(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply `edit` to the tensors of the single model.safetensors and save it back."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- (a) single and sharded files

def test_single_file_reader_lists_every_key(single_dir: Path) -> None:
    """A single-file checkpoint is read from its header; slices report full shapes and read lazily."""
    assert not (single_dir / "model.safetensors.index.json").exists()
    reader = CheckpointReader(single_dir)
    keys = reader.keys()
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert len(keys) == 2 + 1 + 2 * 9  # embed, norm, lm_head + 9 tensors per layer
    s = reader.get_slice("model.layers.0.mlp.gate_proj.weight")
    assert list(s.get_shape()) == [128, 64]
    assert tuple(s[3:5].shape) == (2, 64)


def test_single_file_loads_checkpoint_values(single_dir: Path) -> None:
    """tp=1: every fused and plain parameter equals the checkpoint tensors it came from."""
    ckpt = load_file(single_dir / "model.safetensors")
    p = params(load(single_dir))
    for i in range(2):
        pre = f"model.layers.{i}."
        qkv = torch.cat([ckpt[pre + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        torch.testing.assert_close(p[pre + "self_attn.qkv_proj.weight"], qkv, rtol=0, atol=0)
        gate_up = torch.cat([ckpt[pre + "mlp.gate_proj.weight"], ckpt[pre + "mlp.up_proj.weight"]])
        torch.testing.assert_close(p[pre + "mlp.gate_up_proj.weight"], gate_up, rtol=0, atol=0)
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight"):
            torch.testing.assert_close(p[pre + name], ckpt[pre + name], rtol=0, atol=0)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(p[name], ckpt[name], rtol=0, atol=0)


def test_sharded_checkpoint_matches_single_file(single_dir: Path, sharded_dir: Path) -> None:
    """A max_shard_size export has an index and several files; it loads to identical parameters."""
    index = sharded_dir / "model.safetensors.index.json"
    assert index.is_file()
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    reader = CheckpointReader(sharded_dir)
    assert reader.keys() == CheckpointReader(single_dir).keys() == sorted(weight_map)
    a, b = params(load(single_dir)), params(load(sharded_dir))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_sharded_tp2_rank_matches_single_file(single_dir: Path, sharded_dir: Path) -> None:
    """A tp rank's shard is the same whether the checkpoint is one file or many."""
    a = params(load(single_dir, ThreadTPGroup(1, ThreadCollectives(2))))
    b = params(load(sharded_dir, ThreadTPGroup(1, ThreadCollectives(2))))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_index_naming_missing_file(sharded_dir: Path, tmp_path: Path) -> None:
    """An index entry whose file is gone raises ValueError naming file and key."""
    d = Path(shutil.copytree(sharded_dir, tmp_path / "m"))
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    victim = weight_map["lm_head.weight"]
    (d / victim).unlink()
    with pytest.raises(ValueError, match=victim):
        CheckpointReader(d).get_slice("lm_head.weight")


# ----------------------------------------------------------------------------- (b) ranks read only their slices

class RecordingSlice:
    """Wraps a lazy slice and records the shape of every tensor read through it."""

    def __init__(self, inner: LazySlice, key: str, log: dict[str, list[tuple[int, ...]]]) -> None:
        self.inner, self.key, self.log = inner, key, log

    def get_shape(self) -> list[int]:
        """Full shape, without reading data."""
        return list(self.inner.get_shape())

    def __getitem__(self, index: object) -> torch.Tensor:
        """Read and record."""
        t = self.inner[index]
        self.log.setdefault(self.key, []).append(tuple(t.shape))
        return t


SliceGetter = Callable[[str], LazySlice]


def recorder(log: dict[str, list[tuple[int, ...]]]) -> Callable[[SliceGetter], SliceGetter]:
    """A `wrap` for `load` that records reads into `log`."""
    def wrap(get: Callable[[str], LazySlice]) -> Callable[[str], LazySlice]:
        return lambda key: RecordingSlice(get(key), key, log)
    return wrap


def test_tp_rank_reads_only_its_slices(single_dir: Path) -> None:
    """tp rank 1 of 2 reads half the rows (q/k/v, gate/up, embedding, lm_head) or half the columns (o, down)."""
    log: dict[str, list[tuple[int, ...]]] = {}
    model = load(single_dir, ThreadTPGroup(1, ThreadCollectives(2)), wrap=recorder(log))
    ckpt = load_file(single_dir / "model.safetensors")
    assert set(log) == set(ckpt)  # every tensor read, each once
    assert all(len(v) == 1 for v in log.values())
    pre = "model.layers.0."
    half_rows = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight"]
    half_cols = ["self_attn.o_proj.weight", "mlp.down_proj.weight"]
    for i in range(2):
        for name in half_rows:
            key = f"model.layers.{i}.{name}"
            rows, cols = ckpt[key].shape
            assert log[key] == [(rows // 2, cols)], key
        for name in half_cols:
            key = f"model.layers.{i}.{name}"
            rows, cols = ckpt[key].shape
            assert log[key] == [(rows, cols // 2)], key
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            assert log[f"model.layers.{i}.{name}"] == [(64,)]
    assert log["model.embed_tokens.weight"] == [(48, 64)]
    assert log["lm_head.weight"] == [(48, 64)]
    # And what was read is rank 1's part.
    p = params(model)
    torch.testing.assert_close(p[pre + "self_attn.qkv_proj.weight"][:32], ckpt[pre + "self_attn.q_proj.weight"][32:],
                               rtol=0, atol=0)
    torch.testing.assert_close(p[pre + "mlp.down_proj.weight"], ckpt[pre + "mlp.down_proj.weight"][:, 64:],
                               rtol=0, atol=0)
    torch.testing.assert_close(p["model.embed_tokens.weight"], ckpt["model.embed_tokens.weight"][48:], rtol=0, atol=0)
    torch.testing.assert_close(p["lm_head.weight"], ckpt["lm_head.weight"][48:], rtol=0, atol=0)


def test_tp_rank_reads_only_its_slices_sharded(sharded_dir: Path) -> None:
    """The same half-size reads happen through a sharded checkpoint's per-file handles."""
    log: dict[str, list[tuple[int, ...]]] = {}
    load(sharded_dir, ThreadTPGroup(0, ThreadCollectives(2)), wrap=recorder(log))
    assert log["model.layers.1.self_attn.q_proj.weight"] == [(32, 64)]
    assert log["model.layers.1.mlp.gate_proj.weight"] == [(64, 64)]
    assert log["model.layers.1.mlp.down_proj.weight"] == [(64, 64)]
    assert log["model.embed_tokens.weight"] == [(48, 64)]
    assert log["lm_head.weight"] == [(48, 64)]


# ----------------------------------------------------------------------------- (c) key and shape checks

def test_missing_key_named(copy_dir: Path) -> None:
    """A checkpoint lacking one tensor raises ValueError naming it."""
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite(copy_dir, lambda t: t.pop(key))
    with pytest.raises(ValueError, match="missing keys") as err:
        load(copy_dir)
    assert key in str(err.value)


def test_extra_key_named(copy_dir: Path) -> None:
    """An unexpected tensor raises ValueError naming it."""
    key = "model.layers.0.self_attn.extra_proj.weight"
    rewrite(copy_dir, lambda t: t.__setitem__(key, torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="unexpected keys") as err:
        load(copy_dir)
    assert key in str(err.value)


def test_extra_layer_named(copy_dir: Path) -> None:
    """Tensors of a layer beyond num_hidden_layers are unexpected and named."""
    key = "model.layers.2.input_layernorm.weight"
    rewrite(copy_dir, lambda t: t.__setitem__(key, torch.ones(64)))
    with pytest.raises(ValueError) as err:
        load(copy_dir)
    assert key in str(err.value)


def test_rotary_inv_freq_buffer_ignored(copy_dir: Path, single_dir: Path) -> None:
    """Old exports' rotary_emb.inv_freq buffers are tolerated: the same parameters load as without them."""
    rewrite(copy_dir, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    got, want = params(load(copy_dir)), params(load(single_dir))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("key,shape", [("model.layers.0.self_attn.q_proj.weight", (64, 60)),
                                       ("model.layers.1.mlp.down_proj.weight", (128, 64)),
                                       ("model.embed_tokens.weight", (95, 64)),
                                       ("model.norm.weight", (63,))])
def test_wrong_shape_named(copy_dir: Path, key: str, shape: tuple[int, ...]) -> None:
    """A tensor whose shape disagrees with config.json raises ValueError naming it."""
    rewrite(copy_dir, lambda t: t.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(ValueError, match="shape") as err:
        load(copy_dir)
    assert key in str(err.value)


def test_wrong_shape_named_on_other_rank(copy_dir: Path) -> None:
    """The shape check also fires on a tp rank whose slice would have been in range."""
    key = "model.layers.0.mlp.gate_proj.weight"
    rewrite(copy_dir, lambda t: t.__setitem__(key, torch.zeros(256, 64)))  # rank 0's rows exist, but it is wrong
    with pytest.raises(ValueError) as err:
        load(copy_dir, ThreadTPGroup(0, ThreadCollectives(2)))
    assert key in str(err.value)


# ----------------------------------------------------------------------------- (d) refused formats

def test_pickle_only_folder_refused(tmp_path: Path) -> None:
    """A folder with only pytorch_model.bin is refused, pointing at safetensors."""
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors") as err:
        CheckpointReader(tmp_path)
    assert "pytorch_model.bin" in str(err.value)


def test_empty_or_missing_folder_refused(tmp_path: Path) -> None:
    """No safetensors files, or no folder at all, raise ValueError."""
    with pytest.raises(ValueError, match="safetensors"):
        CheckpointReader(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        CheckpointReader(tmp_path / "nope")


def test_truncated_file_is_named(copy_dir: Path) -> None:
    """A checkpoint cut short (interrupted download) fails with the file's name, not a safetensors traceback."""
    path = next(copy_dir.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{path.name} is unreadable"):
        reader = CheckpointReader(copy_dir)
        for key in reader.keys():
            reader.get_slice(key)[:]


# ----------------------------------------------------------------------------- (e) pipeline stages

def test_pipeline_stages_hold_their_parts(single_dir: Path) -> None:
    """pp=2: stage 0 has the embedding and layer 0 only; stage 1 keeps global index 1, the norm and lm_head."""
    ckpt = load_file(single_dir / "model.safetensors")
    s0, s1 = params(load(single_dir, pp_rank=0, pp_size=2)), params(load(single_dir, pp_rank=1, pp_size=2))
    assert "model.embed_tokens.weight" in s0
    assert not any(k.startswith(("lm_head", "model.norm")) for k in s0)
    assert {k.split(".")[2] for k in s0 if k.startswith("model.layers.")} == {"0"}
    assert "model.embed_tokens.weight" not in s1
    assert "model.norm.weight" in s1 and "lm_head.weight" in s1
    assert {k.split(".")[2] for k in s1 if k.startswith("model.layers.")} == {"1"}
    torch.testing.assert_close(s1["model.layers.1.self_attn.o_proj.weight"],
                               ckpt["model.layers.1.self_attn.o_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(s0["model.layers.0.mlp.down_proj.weight"],
                               ckpt["model.layers.0.mlp.down_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(s1["lm_head.weight"], ckpt["lm_head.weight"], rtol=0, atol=0)


def test_pipeline_stage_reads_only_its_tensors(single_dir: Path) -> None:
    """A stage never reads another stage's tensors."""
    log: dict[str, list[tuple[int, ...]]] = {}
    load(single_dir, pp_rank=1, pp_size=2, wrap=recorder(log))
    assert not any(k.startswith("model.layers.0.") for k in log)
    assert "model.embed_tokens.weight" not in log
    assert "lm_head.weight" in log and "model.layers.1.self_attn.q_proj.weight" in log
