"""Sampling: greedy, seeded reproducibility independent of batch position, and top-k/top-p/min-p filters."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.shard.sampler import Sampler, SamplingParams, filter_logits, inverse_cdf

V = 50


def logits_rows(rows: int, seed: int, vocab: int = V) -> torch.Tensor:
    """Seeded random float32 logits [rows, vocab] with a spread that keeps many tokens plausible."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_greedy_is_argmax() -> None:
    """temperature 0 picks the argmax of every row."""
    logits = logits_rows(6, 0)
    got = Sampler(seed=123)(logits, [SamplingParams(temperature=0.0)] * 6, list(range(6)))
    assert got == logits.argmax(-1).tolist()
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy


def test_seeded_same_step_same_token_across_calls() -> None:
    """The same seed and step yield the same token from different Sampler instances and calls."""
    row = logits_rows(1, 1)
    p = SamplingParams(temperature=1.0, seed=42)
    first = [Sampler(seed=0)(row, [p], [step])[0] for step in range(20)]
    again = [Sampler(seed=999)(row, [p], [step])[0] for step in range(20)]
    shared = Sampler(seed=5)
    twice = [shared(row, [p], [step])[0] for step in range(20)]
    assert first == again == twice
    assert len(set(first)) > 1  # the step feeds the draw: not one token repeated


def test_seeded_token_independent_of_batch_position() -> None:
    """A seeded row's token does not depend on its index in the batch or on its neighbours."""
    target = logits_rows(1, 2)[0]
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    alone = [Sampler()(target.unsqueeze(0), [p], [s])[0] for s in range(10)]
    for pos in range(4):
        others = logits_rows(4, 100 + pos)
        batch = torch.cat([others[:pos], target.unsqueeze(0), others[pos:]])
        params = [SamplingParams(temperature=1.0)] * pos + [p] + [SamplingParams(temperature=1.0, seed=pos)] * (4 - pos)
        for s in range(10):
            steps = [s + 3] * 5
            steps[pos] = s
            assert Sampler(seed=pos)(batch, params, steps)[pos] == alone[s]


def test_different_seeds_differ() -> None:
    """Two seeds drawing 20 tokens from a uniform 100-way distribution give different sequences."""
    flat = torch.zeros(1, 100)
    seqs = [[Sampler()(flat, [SamplingParams(seed=seed)], [s])[0] for s in range(20)] for seed in (1, 2, 3)]
    assert seqs[0] != seqs[1] and seqs[1] != seqs[2] and seqs[0] != seqs[2]


def test_unseeded_rows_use_sampler_generator() -> None:
    """Rows without a seed follow the sampler's own seed: same sampler seed, same draws."""
    flat = torch.zeros(1, 100)
    a, b = Sampler(seed=11), Sampler(seed=11)
    p = [SamplingParams()]
    assert [a(flat, p, [0])[0] for _ in range(20)] == [b(flat, p, [0])[0] for _ in range(20)]


def test_top_k_one_is_argmax() -> None:
    """top_k=1 always returns the argmax, even at a high temperature."""
    logits = logits_rows(8, 3)
    p = SamplingParams(temperature=5.0, top_k=1)
    for trial in range(5):
        assert Sampler(seed=trial)(logits, [p] * 8, [trial] * 8) == logits.argmax(-1).tolist()


def test_tiny_top_p_is_argmax() -> None:
    """A tiny top_p keeps only the most likely token."""
    logits = logits_rows(8, 4)
    p = SamplingParams(temperature=5.0, top_p=1e-6)
    for trial in range(5):
        assert Sampler(seed=trial)(logits, [p] * 8, [trial] * 8) == logits.argmax(-1).tolist()


def test_min_p_one_is_argmax() -> None:
    """min_p=1.0 keeps only tokens as likely as the best one."""
    logits = logits_rows(8, 5)
    p = SamplingParams(temperature=5.0, min_p=1.0)
    for trial in range(5):
        assert Sampler(seed=trial)(logits, [p] * 8, [trial] * 8) == logits.argmax(-1).tolist()


def test_filter_logits_top_p_keeps_smallest_prefix() -> None:
    """top_p keeps the smallest set of top tokens whose mass reaches p (first token always kept)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, SamplingParams(top_p=p))).tolist()  # noqa: E731
    assert kept(0.45) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(0.99) == [True, True, True, True]


def test_filter_logits_min_p_threshold() -> None:
    """min_p drops tokens below min_p times the top probability."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    out = filter_logits(logits, SamplingParams(min_p=0.5))
    assert torch.isfinite(out).tolist() == [True, True, False, False]


def test_filter_logits_temperature_scales() -> None:
    """Unfiltered logits are divided by the temperature."""
    logits = torch.tensor([1.0, -2.0, 4.0])
    torch.testing.assert_close(filter_logits(logits, SamplingParams(temperature=0.5)), logits * 2)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(values=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40),
       top_k=st.integers(1, 10), temperature=st.floats(0.1, 3.0), seed=st.integers(0, 2**20),
       step=st.integers(0, 1000))
def test_sampled_token_always_within_top_k(values: list[float], top_k: int, temperature: float, seed: int,
                                           step: int) -> None:
    """Whatever the logits, a top_k-filtered draw lands on a token at least as large as the k-th largest."""
    logits = torch.tensor(values, dtype=torch.float32)
    p = SamplingParams(temperature=temperature, top_k=top_k, seed=seed)
    token = Sampler()(logits.unsqueeze(0), [p], [step])[0]
    kth = torch.sort(logits, descending=True).values[min(top_k, len(values)) - 1]
    assert logits[token] >= kth


@settings(max_examples=60, deadline=None, derandomize=True)
@given(values=st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=40),
       top_k=st.integers(0, 10), top_p=st.floats(0.01, 1.0), min_p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**20))
def test_filtered_tokens_never_sampled(values: list[float], top_k: int, top_p: float, min_p: float,
                                       seed: int) -> None:
    """Any combination of filters keeps at least one token, and the draw is always a kept token."""
    logits = torch.tensor(values, dtype=torch.float32)
    p = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    kept = torch.isfinite(filter_logits(logits, p))
    assert bool(kept.any()) and logits[kept].max() == logits.max()  # a top token always survives
    token = Sampler()(logits.unsqueeze(0), [p], [0])[0]
    assert bool(kept[token])


@pytest.mark.parametrize("seed", [18446688733644, 2**63 - 1])
def test_large_api_seed_does_not_crash(seed: int) -> None:
    """Every seed the OpenAI schema accepts (0..2**63-1) samples without raising."""
    token = Sampler()(torch.zeros(1, 10), [SamplingParams(seed=seed)], [0])[0]
    assert 0 <= token < 10


def test_penalties_follow_their_definitions() -> None:
    """Repetition divides positive / multiplies negative seen logits; presence and frequency subtract per output."""
    from actors.shard.sampler import apply_penalties

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1])
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.5]
    pf = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [], [2, 2, 3])
    assert pf.tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25]


def test_greedy_with_repetition_penalty_avoids_repeats() -> None:
    """A strong repetition penalty moves greedy off an already-seen top token; logprobs are the raw model's."""
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=1)]
    tokens, lps = Sampler().sample(logits, params, [1], [([0], [])])
    assert tokens == [1]
    lp, top = lps[0]
    assert abs(lp - float(torch.log_softmax(logits[0], -1)[1])) < 1e-6 and top[0][0] == 0


def test_grammar_masks_and_logit_bias_steer_sampling() -> None:
    """Masked rows only draw allowed tokens (greedy or not); a +100 bias wins; other rows are untouched."""
    from actors.shard.sampler import unpack_bitmask

    torch.manual_seed(0)
    logits = torch.randn(3, 70)
    bits = torch.zeros(1, 3, dtype=torch.int32)
    bits[0, 1] = 1 << 4 | 1 << 9  # tokens 36 and 41
    allowed = unpack_bitmask(bits, 70)
    assert allowed[0].nonzero().flatten().tolist() == [36, 41]
    params = [SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0.0, logit_bias=((7, 100.0),)),
              SamplingParams(temperature=0.0)]
    for step in range(20):
        toks, _ = Sampler().sample(logits, params, [step] * 3, [None] * 3, ([0], allowed))
        assert toks[0] in (36, 41) and toks[1] == 7 and toks[2] == int(logits[2].argmax())


def test_sampled_frequencies_follow_the_distribution() -> None:
    """Rows drawn together match their softmax: chi-square over a skewed 300-token vocabulary (two blocks and a
    partial third of the two-level search), at two temperatures and with top-k."""
    torch.manual_seed(3)
    logits = torch.randn(300) * 2
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5), SamplingParams(top_k=20)]
    sampler = Sampler(seed=11)
    draws, rows = 4000, 500  # 500 rows a call: each unseeded row takes its own uniform
    counts = torch.zeros(3, 300)
    for step in range(draws // rows):
        tokens = torch.tensor(sampler(logits.expand(3 * rows, 300), params * rows, [step] * 3 * rows))
        counts += torch.nn.functional.one_hot(tokens.view(rows, 3), 300).sum(0).float()
    for k, p in enumerate(params):
        expected = filter_logits(logits, p).softmax(-1) * draws
        keep = expected >= 5  # chi-square needs expected counts of 5 or more; the rest pooled
        assert counts[k][~keep].sum() <= expected[~keep].sum() * 2 + 20
        observed, exp = counts[k][keep], expected[keep]
        chi2 = float(((observed - exp) ** 2 / exp).sum())
        dof = int(keep.sum()) - 1
        assert chi2 < dof + 5 * (2 * dof) ** 0.5, f"row {k}: chi-square {chi2:.1f} over {dof} degrees of freedom"


def test_inverse_cdf_never_draws_a_zero_probability_token() -> None:
    """Uniforms at the edges (0, just under 1) and mass in odd places still land on tokens that have mass."""
    probs = torch.zeros(4, 600)
    probs[0, 0] = 1.0
    probs[1, 599] = 1.0
    probs[2, [255, 256]] = 0.5
    probs[3, 300:] = 1 / 300
    for u in (0.0, 0.5, 1 - 1e-16):
        tokens = inverse_cdf(probs, torch.full((4,), u, dtype=torch.float64))
        assert (probs.gather(1, tokens[:, None]) > 0).all(), (u, tokens)


def test_verify_greedy_keeps_drafts_while_they_equal_the_argmax() -> None:
    """Drafts are accepted up to the first that differs from the argmax; the token after is that argmax."""
    logits = torch.full((3, V), -5.0)
    logits[0, 5], logits[1, 7], logits[2, 9] = 5.0, 5.0, 5.0
    sampler, greedy = Sampler(0), SamplingParams(temperature=0.0)
    assert sampler.verify(logits, [5, 8], greedy, 0) == ([5], 7)
    assert sampler.verify(logits, [5, 7], greedy, 0) == ([5, 7], 9)
    assert sampler.verify(logits[:1], [], greedy, 0) == ([], 5)


@pytest.mark.parametrize("draft_rank", [0, 3])
def test_verify_sampled_tokens_follow_the_target_distribution(draft_rank: int) -> None:
    """Rejection sampling against a fixed draft (the likeliest token or a middling one): the first emitted token
    is distributed as the filtered softmax (chi-square), and the draft is accepted at its probability."""
    torch.manual_seed(5)
    logits = torch.randn(2, V) * 1.5
    p = SamplingParams(temperature=0.9)
    probs = filter_logits(logits[0], p).softmax(-1)
    draft = int(probs.argsort(descending=True)[draft_rank])
    sampler, trials = Sampler(seed=2), 6000
    counts, accepted = torch.zeros(V), 0
    for step in range(trials):
        kept, nxt = sampler.verify(logits, [draft], p, step)
        counts[kept[0] if kept else nxt] += 1
        accepted += len(kept)
    expected = probs * trials
    keep = expected >= 5
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, f"chi-square {chi2:.1f} over {dof} degrees of freedom"
    assert abs(accepted / trials - float(probs[draft])) < 4 * (float(probs[draft]) / trials) ** 0.5 + 0.01
