"""vLLM's `min_tokens`: EOS and stop_token_ids cannot be sampled before that many tokens, greedy or sampled, with
or without speculative drafts; checked against max_tokens when the request is read."""
from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError

from actors.shard.sampler import Sampler, SamplingParams
from cluster.generate import collect
from cluster.replica import Replica
from cluster.request import GenerationParams
from tests.local_grid import LocalGrid, config
from tests.reference import hf_greedy

STOP = 7


def favouring_stop(rows: int, vocab: int = 32) -> torch.Tensor:
    """Logits whose argmax is STOP in every row, token 3 next."""
    logits = torch.zeros(rows, vocab)
    logits[:, STOP], logits[:, 3] = 5.0, 4.0
    return logits


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_sampler_keeps_stop_tokens_out_below_min_tokens(temperature: float) -> None:
    p = SamplingParams(temperature=temperature, seed=1, min_tokens=3, stop_ids=(STOP,))
    logits = favouring_stop(1)
    logits[:, STOP] = 50.0  # sampled rows would draw it almost surely
    held = [Sampler().sample(logits, [p], [step], [None])[0][0] for step in range(5)]
    assert STOP not in held[:3] and held[3:] == [STOP, STOP]


def test_drafts_are_verified_with_the_stop_tokens_held_below_min_tokens() -> None:
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_ids=(STOP,))
    kept, token = Sampler().verify(favouring_stop(3), [STOP, STOP], p, 0)  # positions 0 and 1 are held
    assert kept == [] and token == 3
    kept, token = Sampler().verify(favouring_stop(3), [3, STOP], p, 0)
    assert kept == [3] and token == 3  # position 1 is held too: the draft STOP there is rejected
    kept, token = Sampler().verify(favouring_stop(3), [3, STOP], p, 1)
    assert kept == [3, STOP] and token == STOP  # from position 2 on it may end


def test_min_tokens_above_max_tokens_is_refused_naming_both() -> None:
    with pytest.raises(ValidationError, match=r"min_tokens \(9\) is above max_tokens \(4\)"):
        GenerationParams(max_tokens=4, min_tokens=9)
    with pytest.raises(ValidationError, match="min_tokens"):
        GenerationParams(min_tokens=-1)
    assert GenerationParams(max_tokens=4, min_tokens=4).sampling().min_tokens == 4


def test_a_stop_token_ends_the_output_only_after_min_tokens(model_dirs: dict) -> None:
    """Greedy with a token HF generates early as a stop token: without min_tokens the output ends there; with
    min_tokens=5 it runs on past it (the stop token masked) and ends at its first occurrence from index 5, or at
    max_tokens."""
    d = str(model_dirs["llama_gqa"])
    prompt = [5, 6, 7, 8, 9, 5, 6]
    ref = hf_greedy(d, prompt, 12)[0]
    first = next(i for i in range(1, 5) if ref[i] not in ref[:i])  # a token whose first occurrence is early
    stop = ref[first]
    replica = Replica(config(d), grid_factory=lambda: LocalGrid(d, 1, 1))

    async def run(min_tokens: int) -> list[int]:
        params = GenerationParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop],
                                  min_tokens=min_tokens)
        return (await collect(replica.generate(prompt, params)))[0].token_ids

    async def both() -> tuple[list[int], list[int]]:
        return await run(0), await run(5)

    plain, held = asyncio.run(both())
    assert plain == ref[:first + 1]
    assert stop not in held[:5] and held[:first] == ref[:first]
    assert len(held) == 12 or (held[-1] == stop and len(held) > 5)
