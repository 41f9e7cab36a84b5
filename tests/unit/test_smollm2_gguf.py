"""The real SmolLM2-135M-Instruct GGUF (Q4_1): our grid decodes exactly what transformers' own GGUF load does."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actors.shard.checkpoint import model_spec
from actors.shard.gguf import PlainReader
from cluster.tokenizer import gguf_chat_template, load_tokenizer
from tests.local_grid import LocalGrid
from tests.reference import grid_greedy, hf_greedy, prefill_logits

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
             "How many legs does a spider have?"]
NEW = 16


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> Any:
    """The tokenizer and chat template transformers builds from the file's metadata."""
    return load_tokenizer(str(smollm2_gguf))


@pytest.fixture(scope="module")
def prompts(tokenizer: Any) -> list[list[int]]:
    """Each question as a chat prompt, ready for the assistant's answer."""
    out = []
    for q in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@pytest.fixture(scope="module")
def references(smollm2_gguf: Path, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens and logits (it dequantizes the GGUF to float32 itself)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32)
    return [hf_greedy(smollm2_gguf, p, NEW, hf) for p in prompts]


def test_metadata(smollm2_gguf: Path, tokenizer: Any) -> None:
    """The spec read from the file is SmolLM2-135M's; the tokenizer carries the file's chat template and EOS."""
    spec = model_spec(smollm2_gguf)
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.intermediate_size) == ("llama", 30, 576, 1536)
    assert (spec.num_heads, spec.num_kv_heads, spec.vocab_size, spec.tie_word_embeddings) == (9, 3, 49152, True)
    assert spec.max_position_embeddings == 8192 and spec.valid_tp_sizes(9) == [1, 3]  # 1536 does not divide by 9
    assert tokenizer.chat_template == gguf_chat_template(PlainReader(smollm2_gguf).fields)
    assert tokenizer.chat_template.startswith("{% for message in messages %}")
    assert spec.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)


@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 1), (1, 2)])
def test_greedy_tokens_and_logits_match_hf(smollm2_gguf: Path, prompts: list, references: list, tokenizer: Any,
                                           tp: int, pp: int) -> None:
    """Chat prompts: HF's greedy tokens exactly, last-prompt logits within fp32 tolerance, and a real answer."""
    grid = LocalGrid(str(smollm2_gguf), tp, pp, num_blocks=128, block_size=4, max_model_len=256)
    for prompt, (_, ref) in zip(prompts, references):
        assert np.abs(prefill_logits(grid, prompt) - ref.numpy()).max() < 1e-3
    got = grid_greedy(grid, prompts, NEW, block_size=4)
    assert got == [tokens for tokens, _ in references]
    assert "Paris" in tokenizer.decode(got[0])
