"""Speculative decoding with a draft model (vLLM's `speculative_config: {model, num_speculative_tokens}`): a
truncated, perturbed copy of the target proposes; greedy output is identical to Hugging Face's and to decoding
without speculation at (tp, pp) = (1, 1) and (1, 2), with prefix caching and preemption; sampled output keeps its
distribution; a draft that cannot serve the target is refused at config time."""
from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from bench.speculative import truncated_copy
from cluster.config import ConfigError, GridServeConfig
from cluster.draft import DraftModel
from cluster.generate import collect
from cluster.replica import Replica
from cluster.request import GenerationParams
from cluster.speculative import SpeculativeConfig
from deployments.make_model import write_model
from tests.local_grid import LocalGrid
from tests.reference import greedy, hf_greedy

LOOPY = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [11, 12, 11, 12, 11, 12, 11], [3, 17, 5, 42, 8, 11, 2, 60, 33, 9],
         [84, 1, 2, 35, 3, 85, 4, 30, 5, 15, 6, 28, 7, 71, 9, 68, 10, 50]]


@pytest.fixture(scope="module")
def target(model_dirs: dict) -> str:
    """The 4-layer GQA Llama the draft serves."""
    return str(model_dirs["llama_gqa"])


@pytest.fixture(scope="module")
def draft(target: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Its first 3 layers with every weight perturbed: most drafts are kept, some rejected."""
    return str(truncated_copy(target, tmp_path_factory.mktemp("draft"), 3, noise=0.1, seed=3))


@pytest.fixture(scope="module")
def refs(target: str) -> list[list[int]]:
    """Hugging Face's 24 greedy tokens after each LOOPY prompt."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    return [hf_greedy(Path(target), p, 24, hf)[0] for p in LOOPY]


def replica(target: str, draft: str | None, tp: int = 1, pp: int = 1, num_blocks: int = 64) -> Replica:
    """A replica over an in-process grid, speculating 4 tokens with `draft` (None: no speculation)."""
    spec = {"model": draft, "num_speculative_tokens": 4} if draft else None
    cfg = GridServeConfig(model=target, max_model_len=min(256, num_blocks * 4), max_num_batched_tokens=256,
                          block_size=4, tensor_parallel_size=tp, pipeline_parallel_size=pp, speculative_config=spec)
    return Replica(cfg, grid_factory=lambda: LocalGrid(target, tp, pp, num_blocks=num_blocks))


def generate(rep: Replica, prompts: list[list[int]], params: GenerationParams, rounds: int = 1
             ) -> list[list[list[int]]]:
    """Every prompt generated together, `rounds` times one after another; the first choice's tokens of each."""
    async def main() -> list[list[list[int]]]:
        out = []
        for _ in range(rounds):
            choices = await asyncio.gather(*(collect(rep.generate(p, params)) for p in prompts))
            out.append([c[0].token_ids for c in choices])
        return out

    return asyncio.run(main())


def drafter(rep: Replica) -> DraftModel:
    """The replica's draft model."""
    assert isinstance(rep.engine.scheduler.drafter, DraftModel)
    return rep.engine.scheduler.drafter


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)])
def test_greedy_output_equals_hf_and_no_speculation(target: str, refs: list[list[int]], draft: str, tp: int,
                                                    pp: int) -> None:
    """Drafts change the number of target steps, never the tokens; a second round hits the prefix cache."""
    assert generate(replica(target, None, tp, pp), LOOPY, greedy(24)) == [refs]
    rep = replica(target, draft, tp, pp)
    assert generate(rep, LOOPY, greedy(24), rounds=2) == [refs, refs]  # round 2: prompts from the prefix cache
    sched = rep.engine.scheduler
    assert 0 < sched.accepted_tokens < sched.draft_tokens  # kept and rejected drafts both happened
    assert rep.engine.stats.steps < 2 * 24 * pp * 0.6  # one token a step: 24 per micro-batch and round
    assert sched.prefix_hit_tokens > 0 and sched.blocks.usage == 0.0
    drafter(rep).propose([], [], [])  # a round frees the draft cache of sequences that left the batch first
    assert drafter(rep).blocks.usage == 0.0 and not drafter(rep).states


def test_preempted_sequences_keep_hf_tokens(target: str, refs: list[list[int]], draft: str) -> None:
    """A KV cache too small for the batch preempts sequences; their draft caches go, their output stays exact."""
    rep = replica(target, draft, num_blocks=24)
    assert generate(rep, LOOPY, greedy(24)) == [refs]
    assert rep.engine.scheduler.num_preemptions > 0 and rep.engine.scheduler.accepted_tokens > 0


def test_limits_and_stop_tokens_inside_kept_drafts(target: str, refs: list[list[int]], draft: str) -> None:
    """max_tokens is exact mid-step and a stop token among kept drafts ends the output there."""
    assert generate(replica(target, draft), LOOPY, greedy(7)) == [[r[:7] for r in refs]]
    stop = refs[0][6]
    got = generate(replica(target, draft), LOOPY, GenerationParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                                   stop_token_ids=[stop]))
    assert got == [[r[:r.index(stop) + 1] if stop in r else r for r in refs]]


def sample_runs(rep: Replica, prompt: list[int], seeds: int, rounds: int) -> list[list[list[int]]]:
    """`rounds` times, one request per seed (temperature 0.8, 4 tokens) all together: each round's tokens."""
    params = [GenerationParams(temperature=0.8, max_tokens=4, ignore_eos=True, seed=s) for s in range(seeds)]

    async def main() -> list[list[list[int]]]:
        out = []
        for _ in range(rounds):
            choices = await asyncio.gather(*(collect(rep.generate(prompt, p)) for p in params))
            out.append([c[0].token_ids for c in choices])
        return out

    return asyncio.run(main())


def test_sampled_output_keeps_its_distribution(target: str, draft: str) -> None:
    """Third output token over 240 seeds, with and without the draft model: the same distribution (two-sample
    chi-square); seeded requests repeat."""
    (plain,) = sample_runs(replica(target, None, num_blocks=256), LOOPY[2], 240, 1)
    rep = replica(target, draft, num_blocks=256)
    spec, again = sample_runs(rep, LOOPY[2], 240, 2)
    assert again == spec
    sched = rep.engine.scheduler
    assert 0 < sched.accepted_tokens < sched.draft_tokens
    counts = [Counter(t[2] for t in run) for run in (plain, spec)]
    bins = [t for t in counts[0] | counts[1] if counts[0][t] + counts[1][t] >= 10]
    chi2 = sum((counts[0][t] - counts[1][t]) ** 2 / (counts[0][t] + counts[1][t]) for t in bins)
    dof = len(bins) - 1
    assert dof >= 2 and chi2 < dof + 5 * (2 * dof) ** 0.5, f"chi-square {chi2:.1f} over {dof} degrees of freedom"


def test_method_inferred_and_draft_layouts_checked(draft: str) -> None:
    """A `model` means draft_model (as in vLLM); n-gram fields, a missing model, a parallel draft are refused."""
    assert SpeculativeConfig(model=draft, num_speculative_tokens=3).method == "draft_model"
    assert SpeculativeConfig(num_speculative_tokens=3).method == "ngram"
    bad = [({"method": "draft_model", "num_speculative_tokens": 2}, "needs `model`"),
           ({"method": "ngram", "model": draft, "num_speculative_tokens": 2}, "method is 'ngram'"),
           ({"model": draft, "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "prompt_lookup_max apply"),
           ({"model": draft, "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}, "set it to 1")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig(**fields)


def test_draft_with_another_vocabulary_is_refused(target: str, tmp_path: Path) -> None:
    """The error names both vocab sizes, the field and the fix; a missing folder names the field too."""
    other = write_model(tmp_path / "other", "llama", seed=2, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, vocab_size=90, max_position_embeddings=256)
    with pytest.raises(ConfigError) as err:
        GridServeConfig.from_args({"model": target, "speculative_config": {"model": str(other),
                                                                           "num_speculative_tokens": 2}})
    assert "vocab_size=90" in str(err.value) and "vocab_size=96" in str(err.value)
    assert "speculative_config.model" in str(err.value) and "tokenizer" in str(err.value)
    with pytest.raises(ConfigError, match="speculative_config.model: .*no config.json"):
        GridServeConfig.from_args({"model": target, "speculative_config": {"model": str(tmp_path / "none"),
                                                                           "num_speculative_tokens": 2}})


def test_target_as_its_own_draft_is_always_accepted(target: str, refs: list[list[int]], tmp_path: Path) -> None:
    """With an exact copy of the target as draft every greedy draft is kept: the draft's cache bookkeeping (what
    it holds after kept and rejected rounds, chunks fed at the right positions) matches the target's tokens."""
    rep = replica(target, str(truncated_copy(target, tmp_path / "same", 4)), num_blocks=64)
    assert generate(rep, LOOPY, greedy(24)) == [refs]
    sched = rep.engine.scheduler
    assert sched.draft_tokens > 40 and sched.accepted_tokens == sched.draft_tokens
