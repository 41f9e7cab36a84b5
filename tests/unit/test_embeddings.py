"""Embeddings through the replica: the last prompt token's final hidden state, equal to Hugging Face's, at every
layout, batched with generation in the same steps; bad inputs are RequestErrors naming the input."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.generate import collect
from cluster.replica import Replica
from cluster.request import RequestError
from tests.local_grid import LocalGrid, config
from tests.reference import PROMPTS, greedy, hf_greedy


def hf_last_hidden(model_dir: Path, prompt: list[int]) -> np.ndarray:
    """transformers' final-norm hidden state at the last position (what the LM head reads)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].numpy()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_embeddings_match_hf_while_generation_runs_beside_them(model_dirs: dict, tp: int, pp: int) -> None:
    """Prompts embedded while other prompts generate: vectors equal HF's, generated tokens still equal HF's."""
    d = model_dirs["llama_gqa"]
    replica = Replica(config(d, tensor_parallel_size=tp, pipeline_parallel_size=pp),
                      grid_factory=lambda: LocalGrid(str(d), tp, pp))

    async def main() -> tuple[list[np.ndarray], list[list[int]]]:
        gen = [collect(replica.generate(p, greedy(5))) for p in PROMPTS]
        vectors, *choices = await asyncio.gather(replica.embed(PROMPTS), *gen)
        return vectors, [c[0].token_ids for c in choices]

    vectors, tokens = asyncio.run(main())
    for prompt, vec in zip(PROMPTS, vectors):
        np.testing.assert_allclose(vec, hf_last_hidden(d, prompt), rtol=1e-4, atol=1e-4)
    assert tokens == [hf_greedy(d, p, 5)[0] for p in PROMPTS]
    assert replica.engine.num_running == 0 and replica.engine.scheduler.blocks.usage == 0.0


def test_a_cached_prefix_still_computes_the_last_token(model_dirs: dict) -> None:
    """The same long prompt twice: the second embedding reuses cached blocks and still equals the first."""
    d = model_dirs["llama_gqa"]
    replica = Replica(config(d), grid_factory=lambda: LocalGrid(str(d), 1, 1))
    prompt = list(range(3, 40))

    async def twice() -> tuple[np.ndarray, np.ndarray]:
        return (await replica.embed([prompt]))[0], (await replica.embed([prompt]))[0]

    first, second = asyncio.run(twice())
    assert replica.engine.scheduler.prefix_hit_tokens > 0
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt,needle", [([], "input 1 is empty"), ([10**7], "outside"),
                                           (list(range(2, 300)), "at most")])
def test_bad_inputs_name_the_input(model_dirs: dict, prompt: list[int], needle: str) -> None:
    """An empty input, an unknown token id or an input over the context length: RequestError on `input`."""
    d = model_dirs["llama_gqa"]
    replica = Replica(config(d), grid_factory=lambda: LocalGrid(str(d), 1, 1))
    with pytest.raises(RequestError, match=needle) as err:
        asyncio.run(replica.embed([[5, 6], prompt]))
    assert err.value.param == "input"
