"""Continuous-batching scheduler: admit, step, retire and (when blocks run out) preempt sequences."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from actors.shard.runner import StepInput, StepOutput
from actors.shard.sampler import SamplingParams
from cluster.blocks import BlockManager


@dataclass
class Sequence:
    """One generation in flight: its tokens, cache blocks and stopping rules."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V already sit in the cache
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        """Prompt followed by everything generated so far."""
        return self.prompt_ids + self.output_ids

    def finish(self, reason: str) -> None:
        """Mark the sequence done with an OpenAI finish reason ('stop', 'length', 'abort', 'error')."""
        self.finish_reason = reason


class Scheduler:
    """Decides which sequences run in each step; prefill of waiting sequences goes first."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; a prompt longer than max_model_len is refused, never truncated."""
        if len(seq.prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(seq.prompt_ids)} tokens but max_model_len={self.max_model_len} "
                             "leaves no room to generate; shorten the prompt or raise max_model_len")
        if not seq.prompt_ids:
            raise ValueError("prompt is empty; give at least one token")
        need = self.blocks.blocks_for(min(len(seq.prompt_ids) + seq.max_tokens, self.max_model_len))
        if need > self.blocks.num_blocks:
            raise ValueError(f"this request needs {need} KV blocks but the cache holds {self.blocks.num_blocks}; "
                             "lower max_tokens or give the KV cache more memory")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step: newly admitted prefills if any fit, else one decode of all."""
        admitted = self._admit()
        if admitted:
            return admitted
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted as a victim below
            while not self.blocks.can_grow(seq.block_table, len(seq.tokens)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self.blocks.grow(seq.block_table, len(seq.tokens))
                scheduled.append(seq)
        return scheduled

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences into the running batch while seats, token budget and blocks allow."""
        batch: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            need = len(seq.tokens) - seq.num_cached
            if need > budget or not self.blocks.can_grow(seq.block_table, len(seq.tokens)):
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, len(seq.tokens))
            batch.append(seq)
            budget -= need
        self.running.extend(batch)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and requeue it first; its tokens are recomputed later."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_cached = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def build_step(self, seqs: list[Sequence]) -> StepInput:
        """Lay the scheduled sequences' uncached tokens end to end for the workers."""
        ids, pos, qlens = [], [], []
        for seq in seqs:
            toks = seq.tokens
            ids.extend(toks[seq.num_cached:])
            pos.extend(range(seq.num_cached, len(toks)))
            qlens.append(len(toks) - seq.num_cached)
        return StepInput(
            token_ids=np.asarray(ids, dtype=np.int64), positions=np.asarray(pos, dtype=np.int64),
            query_lens=qlens, context_lens=[len(s.tokens) for s in seqs],
            block_tables=[list(s.block_table) for s in seqs], sampling=[s.params for s in seqs],
            output_index=[len(s.output_ids) for s in seqs])

    def update(self, seqs: list[Sequence], out: StepOutput) -> list[Sequence]:
        """Append each sampled token, apply stop rules, retire finished sequences; returns the finished."""
        done = []
        for seq, token in zip(seqs, out.token_ids):
            seq.num_cached = len(seq.tokens)
            seq.output_ids.append(token)
            if token in seq.stop_ids:
                seq.finish("stop")
            elif len(seq.output_ids) >= seq.max_tokens or len(seq.tokens) >= self.max_model_len:
                seq.finish("length")
            if seq.finish_reason is not None:
                done.append(seq)
        for seq in done:
            self.retire(seq)
        return done

    def retire(self, seq: Sequence) -> None:
        """Drop a sequence from the batch (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
