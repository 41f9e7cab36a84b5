"""The offline workloads of `bench.peer`, shared by both engines' runners (no torch, Ray or vLLM imports here:
the vLLM runner imports this module from the peer's own venv).

Decode rows time the same streams at two output lengths and divide the extra tokens by the extra wall time,
which cancels start-up, prefill and first-step costs on both engines alike. The throughput row is wall time from
submit to last token, prefill included (what `vllm bench throughput` reports).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    """`streams` requests of `prompt` tokens each, all submitted at once; two output lengths or one."""

    name: str
    streams: int
    prompt: int
    new: tuple[int, ...]  # (short, long): decode rate from the difference; (n,): plain throughput

    def rate(self, walls: list[float]) -> float:
        """Generated tokens per second from the measured wall times (one per entry of `new`)."""
        if len(self.new) == 1:
            return self.streams * self.new[0] / walls[0]
        return self.streams * (self.new[1] - self.new[0]) / (walls[1] - walls[0])


def workloads(quick: bool) -> list[Workload]:
    """Batch-1 decode, 32-stream decode, and 64 x (128 prompt + 128 new) throughput."""
    if quick:
        return [Workload("decode, 1 stream (prompt 32)", 1, 32, (8, 24)),
                Workload("decode, 32 streams (prompt 64)", 32, 64, (8, 24)),
                Workload("throughput, 16 x (128 + 32)", 16, 128, (32,))]
    return [Workload("decode, 1 stream (prompt 32)", 1, 32, (16, 48)),
            Workload("decode, 32 streams (prompt 64)", 32, 64, (16, 48)),
            Workload("throughput, 64 x (128 + 128)", 64, 128, (128,))]


def vocab_size(model: str) -> int:
    """The model's vocabulary size from its config.json."""
    return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])


def make_prompts(n: int, length: int, vocab: int, salt: int) -> list[list[int]]:
    """`n` deterministic prompts; a different `salt` changes every first token, so no run reuses another's
    cached prefix (both engines cache prefixes by default)."""
    return [[(7 * i + 13 * r + 101 * salt + 3) % (vocab - 10) + 10 for i in range(length)] for r in range(n)]


def to_json(w: Workload) -> dict:
    """A workload as a JSON-ready dict."""
    return asdict(w)
