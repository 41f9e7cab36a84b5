"""The step-size estimate that decides inline vs object store never undercounts the pickled step."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from actors.shard.runner import StepInput
from actors.shard.sampler import SamplingParams
from cluster.grid import INLINE_STEP_BYTES, wire_bytes


def make_step(seqs: int, new: int, ctx: int, penalties: bool) -> StepInput:
    """A step of `seqs` sequences with `new` tokens each over `ctx`-token contexts."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 150_000, seqs * new)
    sampling = [SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=i, repetition_penalty=1.1,
                               presence_penalty=0.5, frequency_penalty=0.25, logprobs=5) for i in range(seqs)]
    histories = [(rng.integers(0, 150_000, ctx).tolist(), rng.integers(0, 150_000, 7).tolist()) for _ in range(seqs)]
    return StepInput(tokens, np.tile(np.arange(ctx - new, ctx), seqs), [new] * seqs, [ctx] * seqs,
                     [list(range(i * 300, i * 300 + -(-ctx // 16))) for i in range(seqs)], sampling,
                     [7] * seqs, histories=histories if penalties else None)


@pytest.mark.parametrize("seqs,new,ctx,penalties", [(1, 1, 40, False), (64, 1, 256, False), (64, 1, 256, True),
                                                    (8, 128, 128, True), (1, 1024, 1024, False)])
def test_wire_bytes_is_an_upper_bound(seqs: int, new: int, ctx: int, penalties: bool) -> None:
    """Estimate >= real pickled size, and not wildly above it."""
    step = make_step(seqs, new, ctx, penalties)
    real = len(pickle.dumps(step))
    assert real <= wire_bytes(step) <= 8 * real + 4096


def test_decode_steps_travel_inline() -> None:
    """A 64-sequence decode step is small enough to go inline; a 1024-token prefill with histories is not."""
    assert wire_bytes(make_step(64, 1, 256, False)) < INLINE_STEP_BYTES
    assert wire_bytes(make_step(8, 128, 1024, True)) >= INLINE_STEP_BYTES


def test_wire_bytes_counts_grammar_masks() -> None:
    """Steps carrying structured-output bitmasks (every row constrained, a 150k-token vocabulary) stay bounded."""
    import numpy as np

    step = make_step(32, 1, 256, False)
    step.allowed = (list(range(32)), np.full((32, (150_000 + 31) // 32), -1, dtype=np.int32))
    real = len(pickle.dumps(step))
    assert real <= wire_bytes(step) <= 2 * real + 4096
