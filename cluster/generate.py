"""Offline generation: run many requests through a grid with continuous batching, results as they finish."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from actors.shard.runner import StepInput, StepOutput
from actors.shard.sampler import SamplingParams
from cluster.blocks import BlockManager
from cluster.scheduler import Scheduler, Sequence


class Executor(Protocol):
    """Anything that runs one step over a whole grid (the Ray grid, or an in-process one in tests)."""

    num_blocks: int

    def execute(self, step: StepInput) -> StepOutput: ...


@dataclass
class Request:
    """One generation request, already tokenized."""

    request_id: Any
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class Result:
    """A finished request."""

    request_id: Any
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


class Generator:
    """Drives a scheduler and an executor until every request is done."""

    def __init__(self, executor: Executor, tokenizer: Any, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self.scheduler = Scheduler(BlockManager(executor.num_blocks, block_size), max_num_seqs,
                                   max_num_batched_tokens, max_model_len)
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}

    def add(self, req: Request) -> None:
        """Queue a request (raises ValueError if it can never fit)."""
        seq = Sequence(next(self._ids), list(req.prompt_ids), req.sampling, req.max_tokens,
                       self.eos | frozenset(req.stop_token_ids))
        self.scheduler.add(seq)
        self._requests[seq.seq_id] = req

    def run(self) -> Iterator[Result]:
        """Step until idle, yielding each request as soon as it finishes."""
        while self.scheduler.has_work():
            seqs = self.scheduler.schedule()
            out = self.executor.execute(self.scheduler.build_step(seqs))
            finished = self.scheduler.update(seqs, out)
            for seq in seqs:
                if seq.finish_reason is None and self._hit_stop_string(seq):
                    self.scheduler.retire(seq)
                    finished.append(seq)
            for seq in finished:
                yield self._result(seq)

    def _text(self, ids: list[int]) -> str:
        """Detokenize, or empty text when no tokenizer is attached (token-id only use)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Finish `seq` if its text now contains one of its request's stop strings."""
        stops = self._requests[seq.seq_id].stop
        if stops and any(s in self._text(seq.output_ids) for s in stops):
            seq.finish("stop")
            return True
        return False

    def _result(self, seq: Sequence) -> Result:
        """Package a finished sequence; text is cut before a matched stop string, like OpenAI's API."""
        req = self._requests.pop(seq.seq_id)
        ids = seq.output_ids
        if ids and ids[-1] in seq.stop_ids:
            ids = ids[:-1]  # the stop token itself is not part of the completion text
        text = self._text(ids)
        for s in req.stop:
            if s in text:
                text = text[:text.index(s)]
        return Result(req.request_id, seq.prompt_ids, seq.output_ids, text, seq.finish_reason or "length")
