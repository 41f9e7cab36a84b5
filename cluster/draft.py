"""Speculative decoding with a draft model: a smaller model with the target's tokenizer proposes k tokens per
decoding sequence, greedily, batched over the sequences of a step; the target verifies them as it verifies n-gram
drafts (a greedy draft is a point mass, so rejection sampling keeps sampled output exact).

The draft runs as a one-worker stage (`StageRunner`, tp = pp = 1) in the engine's process, on its CPU, with its
own KV cache and block manager. Each sequence's draft cache is tracked by the tokens it holds; a round feeds what is
new since then (the drafts the target kept and its own next token, or the whole prompt at first), then k - 1 single
tokens. Draft tokens the target rejected are simply overwritten later: the draft's context ends where the verified
tokens end. The cache of a sequence that left the running batch (finished, aborted, preempted) is freed at the
start of the next round, before anything else takes draft blocks: only rounds use them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from actors.shard.runner import ShardPlan, StageRunner, StepInput, StepOutput
from actors.shard.sampler import SamplingParams
from actors.shard.tp import TPGroup
from cluster.blocks import BlockManager
from cluster.sequence import Sequence

log = logging.getLogger("gridserve.draft")
GREEDY = SamplingParams(temperature=0.0)


class DraftGrid(Protocol):
    """What runs the draft's steps: one stage answering sampled tokens (a StageRunner, or tests' LocalGrid)."""

    def execute(self, step: StepInput) -> Any:
        """Run one step; the sampled token of each sequence comes back in a StepOutput."""
        ...


@dataclass
class DraftState:
    """One sequence's draft KV cache: its blocks and the tokens they hold, in order."""

    table: list[int] = field(default_factory=list)
    known: int = 0  # leading tokens of the sequence held (checked when fed)
    fed: list[int] = field(default_factory=list)  # draft tokens held after those (maybe rejected since)


class DraftModel:
    """Proposes draft tokens for decoding sequences with a small model (`cluster.speculative.Drafter`)."""

    def __init__(self, grid: DraftGrid, num_blocks: int, block_size: int) -> None:
        self.grid = grid
        self.blocks = BlockManager(num_blocks, block_size)  # no prefix cache: drafts are cheap to recompute
        self.states: dict[int, DraftState] = {}
        self.steps = 0  # draft steps run (a round is one per draft position)

    def propose(self, seqs: list[Sequence], rooms: list[int], live: list[Sequence]) -> list[list[int]]:
        """Up to `rooms[i]` greedy draft tokens for each of `seqs` (none where the draft's cache is full); drops the
        cache of every sequence not in `live` (finished or preempted) first."""
        self._forget_all_but({s.seq_id for s in live})
        drafts: list[list[int]] = [[] for _ in seqs]
        rows = [i for i, (seq, room) in enumerate(zip(seqs, rooms)) if room > 0 and self._fit(seq, room)]
        if not rows:
            return drafts
        first = self._feed_new(seqs, rows)
        for i, token in zip(rows, first):
            drafts[i].append(token)
        for j in range(1, max(rooms[i] for i in rows)):
            rows = [i for i in rows if rooms[i] > j]
            tokens = self._step([seqs[i].seq_id for i in rows], [[drafts[i][-1]] for i in rows],
                                [len(seqs[i].tokens) + j - 1 for i in rows])
            for i, token in zip(rows, tokens):
                self.states[seqs[i].seq_id].fed.append(drafts[i][-1])
                drafts[i].append(token)
        return drafts

    def _fit(self, seq: Sequence, room: int) -> bool:
        """Make room in the draft cache for the sequence's tokens and `room - 1` drafts; False (and its cache
        dropped) when blocks run out."""
        state = self.states.setdefault(seq.seq_id, DraftState())
        need = len(seq.prompt_ids) + len(seq.output_ids) + room - 1
        if not self.blocks.can_grow(state.table, need):
            self._forget(seq.seq_id)
            return False
        self.blocks.grow(state.table, need)
        return True

    def _feed_new(self, seqs: list[Sequence], rows: list[int]) -> list[int]:
        """One draft step over each row's tokens not yet (or wrongly) in the draft cache: the first drafts."""
        ids, starts = [], []
        for i in rows:
            seq, state = seqs[i], self.states[seqs[i].seq_id]
            start = self._valid(state, seq)
            ids.append(seq.span(start, len(seq.prompt_ids) + len(seq.output_ids)))
            starts.append(start)
            state.known, state.fed = starts[-1] + len(ids[-1]), []
        return self._step([seqs[i].seq_id for i in rows], ids, starts)

    @staticmethod
    def _valid(state: DraftState, seq: Sequence) -> int:
        """How many leading tokens of `seq` the draft cache holds: what was fed and checked, then the drafts that
        the target kept (at most all but the last token, whose logits a step must compute)."""
        total = len(seq.prompt_ids) + len(seq.output_ids)
        kept = 0
        for token, actual in zip(state.fed, seq.span(state.known, state.known + len(state.fed))):
            if token != actual:
                break
            kept += 1
        return min(state.known + kept, total - 1)

    def _step(self, seq_ids: list[int], ids: list[list[int]], starts: list[int]) -> list[int]:
        """One greedy draft step: each sequence's `ids` written from position `starts[i]`, its next token read."""
        lens = [len(x) for x in ids]
        step = StepInput(
            token_ids=np.fromiter((t for x in ids for t in x), dtype=np.int64, count=sum(lens)),
            positions=np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, lens)]),
            query_lens=lens, context_lens=[s + n for s, n in zip(starts, lens)],
            block_tables=[self.states[i].table for i in seq_ids], sampling=[GREEDY] * len(ids),
            output_index=[0] * len(ids))
        out = self.grid.execute(step)
        assert isinstance(out, StepOutput), "the draft grid's one stage answers sampled tokens"
        self.steps += 1
        return [int(t) for t in out.token_ids]

    def _forget_all_but(self, live: set[int]) -> None:
        """Free the draft cache of sequences that left the running batch."""
        for seq_id in [s for s in self.states if s not in live]:
            self._forget(seq_id)

    def _forget(self, seq_id: int) -> None:
        """Free one sequence's draft cache; a later round recomputes it from its first token."""
        state = self.states.pop(seq_id, None)
        if state is not None:
            self.blocks.release(state.table)


def load_draft(model: str, num_tokens: int, block_size: int, max_model_len: int, dtype: str | None) -> DraftModel:
    """The draft model loaded whole into this process's CPU memory, with a KV cache of `num_tokens` tokens (host
    pages are taken as tokens fill it). Never on a GPU: this process may see a worker's GPU (a batch job's driver)
    whose memory that worker has already taken."""
    plan = ShardPlan(model, 0, 1, 0, 1, dtype, max_model_len, block_size)
    runner = StageRunner(plan, TPGroup.single(), torch.device("cpu"))
    num_blocks = max(1, -(-num_tokens // block_size))
    runner.allocate_cache(num_blocks)
    log.info("draft model %s: %d layers, %.1f MiB of weights, %d KV blocks, on %s", model, runner.spec.num_layers,
             runner.weight_bytes() / 2**20, num_blocks, runner.device)
    return DraftModel(runner, num_blocks, block_size)
