"""n-gram speculative decoding: drafts from the sequence's own earlier tokens, verified in one step; greedy output
identical to Hugging Face's at every layout, limits and stop tokens honoured inside a step's kept drafts."""
from __future__ import annotations

import asyncio

import pytest

from cluster.generate import collect
from cluster.replica import Replica
from cluster.request import GenerationParams
from cluster.speculative import propose
from tests.local_grid import LocalGrid, config
from tests.reference import greedy, hf_greedy

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
LOOPY = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [11, 12, 11, 12, 11, 12, 11], [3, 17, 5, 42, 8, 11, 2, 60, 33, 9],
         [84, 1, 2, 35, 3, 85, 4, 30, 5, 15, 6, 28, 7, 71, 9, 68, 10, 50]]  # the last: drafts the model rejects


def test_propose_copies_what_followed_the_latest_match() -> None:
    """The longest suffix n-gram that occurred before decides; what followed its latest occurrence is the draft."""
    assert propose([1, 2, 3, 4, 1, 2], 3, 1, 4) == [3, 4, 1]
    assert propose([9, 1, 5, 2, 1, 5], 2, 1, 3) == [2, 1]
    assert propose([1, 2, 3], 2, 1, 3) == []  # nothing repeats
    assert propose([7, 7], 5, 1, 2) == [7]  # cut at the sequence's end


def run(d: str, tp: int, pp: int, params: GenerationParams) -> tuple[list[list[int]], Replica]:
    """Each LOOPY prompt generated together with speculation on, over an in-process tp x pp grid."""
    replica = Replica(config(d, tensor_parallel_size=tp, pipeline_parallel_size=pp, speculative_config=SPEC),
                      grid_factory=lambda: LocalGrid(d, tp, pp))

    async def main() -> list[list[int]]:
        choices = await asyncio.gather(*(collect(replica.generate(p, params)) for p in LOOPY))
        return [c[0].token_ids for c in choices]

    return asyncio.run(main()), replica


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_greedy_output_equals_hf_with_drafts_accepted(model_dirs: dict, tp: int, pp: int) -> None:
    """Speculation changes the number of steps, never the tokens: equal to HF greedy, with drafts kept."""
    d = str(model_dirs["llama_gqa"])
    tokens, replica = run(d, tp, pp, greedy(24))
    assert tokens == [hf_greedy(d, p, 24)[0] for p in LOOPY]
    sched = replica.engine.scheduler
    assert sched.draft_tokens > 0 and 0 < sched.accepted_tokens <= sched.draft_tokens
    assert replica.engine.stats.steps < 24 * pp  # one token a step: 24 steps per micro-batch (the prompts share)
    assert sched.accepted_tokens < sched.draft_tokens  # some drafts were wrong and rejected
    assert sched.blocks.usage == 0.0


def test_stop_token_and_length_inside_kept_drafts(model_dirs: dict) -> None:
    """A stop token met among kept drafts ends the output there; max_tokens is exact even mid-step."""
    d = str(model_dirs["llama_gqa"])
    refs = [hf_greedy(d, p, 24)[0] for p in LOOPY]
    stop = refs[0][6]
    tokens, _ = run(d, 1, 1, GenerationParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                              stop_token_ids=[stop]))
    for ref, got in zip(refs, tokens):
        expected = ref[:ref.index(stop) + 1] if stop in ref else ref
        assert got == expected
    tokens, _ = run(d, 1, 1, greedy(7))
    assert tokens == [ref[:7] for ref in refs]


def test_sampled_requests_run_and_seeded_ones_repeat(model_dirs: dict) -> None:
    """Sampled generation with speculation finishes every request; the same seed gives the same tokens."""
    d = str(model_dirs["llama_gqa"])
    params = GenerationParams(temperature=0.7, max_tokens=16, ignore_eos=True, seed=11)
    first, replica = run(d, 1, 1, params)
    second, _ = run(d, 1, 1, params)
    assert first == second and all(len(t) == 16 for t in first)
    assert replica.engine.scheduler.draft_tokens > 0


def test_acceptance_counters_reach_metrics(model_dirs: dict) -> None:
    """/metrics text carries the draft and accepted counters the scheduler kept."""
    d = str(model_dirs["llama_gqa"])
    _, replica = run(d, 1, 1, greedy(12))
    text = asyncio.run(replica.metrics_text()).decode()
    sched = replica.engine.scheduler
    assert "gridserve_spec_decode_num_draft_tokens_total{model_name=" in text
    drafted = [line for line in text.splitlines() if line.startswith("gridserve_spec_decode_num_draft_tokens_total")]
    accepted = [line for line in text.splitlines()
                if line.startswith("gridserve_spec_decode_num_accepted_tokens_total")]
    assert float(drafted[0].split()[-1]) == sched.draft_tokens > 0
    assert float(accepted[0].split()[-1]) == sched.accepted_tokens > 0
