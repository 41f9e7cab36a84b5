"""One step's input from the sequences the scheduler picked: tokens end to end, positions, tables, sampling."""
from __future__ import annotations

import numpy as np

from actors.shard.runner import NO_TOKEN, StepInput
from cluster.sequence import Sequence
from cluster.structured import GrammarMatchers


def lay_out(seqs: list[Sequence], grammars: GrammarMatchers | None) -> StepInput:
    """Lay each scheduled sequence's chunk of uncached tokens end to end for the workers."""
    ids: list[int] = []
    pos: list[int] = []
    ends: list[int] = []
    follow = [-1] * len(seqs)
    for row, seq in enumerate(seqs):
        first = seq.num_cached + seq.ahead  # a follower's new token sits one past what its other step computes
        end = first + seq.chunk
        if seq.ahead:
            ids.append(NO_TOKEN)  # unknown here: the worker puts what it sampled for row `follow` in its place
            follow[row] = seq.row
        else:
            ids.extend(seq.span(first, end - len(seq.drafts)))
            ids.extend(seq.drafts)  # after its last known token: verified in this step
        pos.extend(range(first, end))
        ends.append(end)
        seq.row = row
    # Only a sequence whose chunk reaches its last token samples; penalties and grammars matter only there.
    sample = [end == len(s.prompt_ids) + len(s.output_ids) + len(s.drafts) + s.ahead
              for s, end in zip(seqs, ends)]
    history = [s.params.needs_history and go for s, go in zip(seqs, sample)]
    return StepInput(
        token_ids=np.asarray(ids, dtype=np.int64), positions=np.asarray(pos, dtype=np.int64),
        query_lens=[s.chunk for s in seqs], context_lens=ends,
        block_tables=[list(s.block_table) for s in seqs], sampling=[s.params for s in seqs],
        output_index=[len(s.output_ids) + s.ahead for s in seqs],
        histories=[(s.prompt_ids, s.output_ids) if h else None for s, h in zip(seqs, history)]
        if any(history) else None,
        allowed=masks(seqs, sample, grammars), sample=None if all(sample) else sample,
        pool=[s.pool for s in seqs] if any(s.pool for s in seqs) else None,
        drafts=[len(s.drafts) for s in seqs] if any(s.drafts for s in seqs) else None,
        lora=[s.lora_slot for s in seqs] if any(s.lora_slot is not None for s in seqs) else None,
        follow=follow if any(r >= 0 for r in follow) else None)


def masks(seqs: list[Sequence], sample: list[bool], grammars: GrammarMatchers | None
          ) -> tuple[list[int], np.ndarray] | None:
    """Grammar bitmasks of the constrained sequences that sample in this step (None if there are none)."""
    rows = [i for i, (s, go) in enumerate(zip(seqs, sample)) if go and s.grammar is not None]
    if not rows or grammars is None:
        return None
    return rows, grammars.masks([seqs[i].seq_id for i in rows], [len(seqs[i].output_ids) for i in rows])
