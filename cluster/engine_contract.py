"""The engine's boundary types: what it streams per request, what it drives, what it counts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from actors.shard.runner import StepInput, StepOutput
from actors.shard.sampler import Logprobs


@dataclass
class TokenEvent:
    """One streamed item: a new token (with logprobs if asked), the finish reason on the last one, or an error."""

    token_id: int | None
    finish_reason: str | None = None
    error: str | None = None
    logprobs: Logprobs | None = None
    cached_tokens: int | None = None  # on the first token: prompt tokens whose KV came from the prefix cache


class StepGrid(Protocol):
    """What the engine drives: a grid that runs one step at a time (WorkerGrid, or tests' in-process grid)."""

    tp: int
    pp: int
    num_blocks: int

    async def step_async(self, step: StepInput) -> StepOutput:
        """Run one step through every stage; the last stage's TP rank 0 answers."""
        ...


@dataclass
class EngineStats:
    """Counters the metrics exporter and benchmarks read."""

    steps: int = 0
    busy_s: float = 0.0  # wall time with at least one step in flight
    prompt_tokens: int = 0
    generation_tokens: int = 0
