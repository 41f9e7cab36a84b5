"""Small random llama / qwen2 models written as GGUF: our sharded load decodes HF's logits and tokens."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.torch import load_file, save_file

import actors.shard.gguf as gg
from actors.shard.checkpoint import model_spec, open_checkpoint
from actors.shard.spec import ModelSpec
from cluster.config import GridServeConfig
from cluster.tokenizer import load_tokenizer
from deployments.make_model import write_model
from tests.configs import VARIANTS
from tests.gguf_files import write_gguf
from tests.local_grid import LocalGrid
from tests.reference import PROMPTS, grid_greedy, hf_greedy, prefill_logits

NAMES = ["llama_gqa", "qwen2_bias", "llama_tied_mqa"]
LONG = [int(x) for x in np.random.default_rng(5).integers(0, 90, 60)]  # reaches past Llama 3's 32-token band
NEW = 8
REL = 1e-5  # fp32 tolerance relative to the largest logit (the models' logits are ~0.1)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared test variants with q/k weights scaled x6: attention is sharp, so the q/k row order and the
    rope frequencies visibly move the logits (random init alone leaves attention nearly uniform)."""
    root = tmp_path_factory.mktemp("gguf_hf")
    out = {}
    for name in NAMES:
        family, cfg = VARIANTS[name]
        d = write_model(root / name, family, seed=1, tokenizer=False, **cfg)
        tensors = load_file(d / "model.safetensors")
        for key in tensors:
            if key.endswith(("q_proj.weight", "k_proj.weight")):
                tensors[key] = tensors[key] * 6
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        out[name] = d
    return out


@pytest.fixture(scope="module")
def references(hf_dirs: dict[str, Path]) -> dict[str, list]:
    """HF greedy tokens and last-prompt logits (from the safetensors checkpoint) per variant and prompt."""
    import transformers

    models = {name: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
              for name, d in hf_dirs.items()}
    return {name: [hf_greedy(d, p, NEW, models[name]) for p in [*PROMPTS, LONG]] for name, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def f32_files(hf_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every variant converted to an F32 GGUF, as llama.cpp's converter lays it out."""
    root = tmp_path_factory.mktemp("gguf_f32")
    return {name: write_gguf(d, root / f"{name}.gguf") for name, d in hf_dirs.items()}


def max_diff(grid: LocalGrid, refs: list) -> float:
    """Largest logit difference over all prompts, relative to the largest reference logit."""
    diffs = [np.abs(prefill_logits(grid, p) - ref.numpy()).max() / np.abs(ref.numpy()).max()
             for p, (_, ref) in zip([*PROMPTS, LONG], refs)]
    return float(max(diffs))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (4, 1)])
@pytest.mark.parametrize("name", NAMES)
def test_f32_gguf_matches_hf(f32_files: dict, references: dict, name: str, tp: int, pp: int) -> None:
    """An F32 GGUF (q/k rows interleaved, Llama 3 rope as rope_freqs) gives HF's logits and greedy tokens."""
    grid = LocalGrid(str(f32_files[name]), tp, pp, num_blocks=64, block_size=4)
    assert max_diff(grid, references[name]) < REL
    prompts = [*PROMPTS, LONG]
    assert grid_greedy(grid, prompts, NEW, block_size=4) == [t for t, _ in references[name]]


def test_the_checks_can_fail(hf_dirs: dict, f32_files: dict, references: dict, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the q/k un-interleave, or without the rope factors, the logits are far outside the tolerance."""
    no_freqs = write_gguf(hf_dirs["llama_gqa"], tmp_path / "nofreqs.gguf", rope_freqs=False)
    assert max_diff(LocalGrid(str(no_freqs), 1, 1), references["llama_gqa"]) > 20 * REL
    monkeypatch.setattr(gg, "unpermute_rows", lambda rows, head_dim: np.arange(rows))
    assert max_diff(LocalGrid(str(f32_files["llama_tied_mqa"]), 1, 1), references["llama_tied_mqa"]) > 20 * REL


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
@pytest.mark.parametrize("name", ["qwen2_bias", "llama_tied_mqa"])
def test_quantized_gguf_matches_hf_gguf_load(hf_dirs: dict, tmp_path: Path, name: str, tp: int, pp: int) -> None:
    """Q8_0 / Q4_0 / Q4_1 / F16 / BF16 tensors: our logits equal those of transformers' own GGUF load.

    (llama_gqa is left out: transformers ignores the rope_freqs tensor, so its GGUF load is not Llama 3.)
    """
    import transformers

    kinds = itertools.cycle([T.Q8_0, T.Q4_0, T.Q4_1, T.F16, T.BF16])
    path = write_gguf(hf_dirs[name], tmp_path / "q.gguf", qtype=lambda n, a: next(kinds))
    types = {t.tensor_type for t in open_checkpoint(path).reader.tensors}
    assert {T.Q8_0, T.Q4_0, T.Q4_1, T.F16, T.BF16} <= types
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    grid = LocalGrid(str(path), tp, pp, num_blocks=64, block_size=4)
    for prompt in [*PROMPTS, LONG]:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert np.abs(prefill_logits(grid, prompt) - ref).max() < REL * np.abs(ref).max()


def test_spec_from_metadata(f32_files: dict, hf_dirs: dict) -> None:
    """The GGUF spec equals the config.json spec, except the rope form and the (float32) dtype."""
    for name in NAMES:
        ours, hf = model_spec(f32_files[name]), ModelSpec.from_dir(hf_dirs[name])
        assert ours.dtype == "float32"
        assert (ours.rope_scaling is not None) == (hf.rope_scaling is not None)
        fields = ["family", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "vocab_size", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                  "qkv_bias", "o_bias", "mlp_bias", "eos_token_ids"]
        assert {f: getattr(ours, f) for f in fields} == {f: getattr(hf, f) for f in fields}
        assert ours.rms_norm_eps == pytest.approx(hf.rms_norm_eps)


def test_folder_with_one_gguf_and_served_name(f32_files: dict, tmp_path: Path) -> None:
    """A folder holding one .gguf is that model; the served name of a file is its stem; two files are refused."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tiny.Q8_0.gguf").write_bytes(f32_files["qwen2_bias"].read_bytes())
    assert model_spec(folder) == model_spec(f32_files["qwen2_bias"])
    cfg = GridServeConfig(model=str(folder / "tiny.Q8_0.gguf"), max_model_len=128)
    assert cfg.model_name == "tiny.Q8_0" and cfg.spec().family == "qwen2"
    assert GridServeConfig(model=str(folder), max_model_len=128).model_name == "m"
    assert load_tokenizer(str(folder)) is None  # no vocabulary in the file: requests must send token ids
    (folder / "other.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 GGUF files \['other.gguf', 'tiny.Q8_0.gguf'\]"):
        model_spec(folder)
    with pytest.raises(ValueError, match="does not exist"):
        model_spec(tmp_path / "missing.gguf")


def test_bad_files_are_named(hf_dirs: dict, tmp_path: Path) -> None:
    """Unknown tensor names, wrong shapes, missing tensors and foreign architectures fail, naming them."""
    d = hf_dirs["qwen2_bias"]
    extra = write_gguf(d, tmp_path / "a.gguf", extra={"blk.0.attn_q_norm.weight": (np.ones(16, np.float32), T.F32)})
    with pytest.raises(ValueError, match=r"\['blk.0.attn_q_norm.weight'\] have no counterpart"):
        open_checkpoint(extra)
    short = write_gguf(d, tmp_path / "b.gguf", edit=lambda n, a: a[:-1] if n == "blk.1.attn_k.weight" else a)
    with pytest.raises(ValueError, match=r"'blk.1.attn_k.weight' \(model.layers.1.self_attn.k_proj.weight\) has "
                                         r"shape \[31, 64\], expected \[32, 64\]"):
        open_checkpoint(short)
    missing = write_gguf(d, tmp_path / "c.gguf", edit=lambda n, a: None if n == "blk.2.ffn_up.weight" else a)
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.2.mlp.up_proj.weight'\]"):
        LocalGrid(str(missing), 1, 1)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(extra.read_bytes()[:len(extra.read_bytes()) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="cut.gguf is not a readable GGUF file"):
        open_checkpoint(cut)
    foreign = write_gguf(d, tmp_path / "d.gguf", arch="gemma")
    with pytest.raises(ValueError, match=r"GGUF architecture 'gemma'.*supported: \['llama', 'qwen2'\]"):
        model_spec(foreign)
