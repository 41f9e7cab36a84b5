"""One generation in flight, as the scheduler tracks it: tokens, cache blocks, chunk, stopping rules."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors.shard.sampler import SamplingParams
from cluster.structured import GrammarSpec


@dataclass(eq=False)  # identity: `seq in running` must not compare every field of every sequence (O(n^2) per step)
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
    hashed_blocks: int = 0  # leading full blocks registered with the prefix cache
    hash_parent: int = -1  # content id of the last of them (-1: none)
    finish_reason: str | None = None
    num_preemptions: int = 0
    in_flight: bool = False  # part of a step the grid has not answered yet (pipelined steps)
    ahead: bool = False  # in two unanswered steps: the later one's input is the token the earlier one samples
    row: int = -1  # its row in the latest step built (what a step looking ahead of that one points at)
    arrival: float = 0.0  # perf_counter() at submit (queue time, TTFT)
    scheduled_at: float | None = None  # perf_counter() of its first step
    grammar: GrammarSpec | None = None  # structured output: its tokens are masked by this grammar
    cached_prompt_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    chunk: int = 0  # tokens it computes in its current step (1 when decoding; a prompt chunk otherwise)
    priority: int = 0  # lower runs first (vLLM's priority policy); ties go in arrival order
    pool: bool = False  # an embedding: its prompt's last hidden state is the answer; it generates nothing
    hidden: np.ndarray | None = None  # that hidden state, once its prompt is computed
    drafts: list[int] = field(default_factory=list)  # speculative tokens riding in its current step
    new_tokens: int = 0  # tokens its last answered step appended (more than 1 when drafts were accepted)
    lora_slot: int | None = None  # its LoRA adapter's slot on the workers (None: the base model)
    lora_root: int = -1  # prefix-cache parent of its first block: KV computed under another adapter never matches

    @property
    def rank(self) -> tuple[int, int]:
        """Admission order: priority, then arrival (sequence ids grow with arrival)."""
        return self.priority, self.seq_id

    @property
    def tokens(self) -> list[int]:
        """Prompt followed by everything generated so far."""
        return self.prompt_ids + self.output_ids

    def span(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (a decode step slices one token per sequence)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - p)]

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache: 1 while decoding, more while its prompt is (re)computed."""
        return len(self.prompt_ids) + len(self.output_ids) - self.num_cached

    def finish(self, reason: str) -> None:
        """Mark the sequence done with an OpenAI finish reason ('stop', 'length', 'abort', 'error')."""
        self.finish_reason = reason
