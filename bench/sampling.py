"""Sampling cost per step on the last stage: `Sampler` (rows drawn together by a two-level inverse CDF) beside
one `torch.multinomial` per row (what PyTorch offers, and what the sampler did before), same logits, one thread.

python -m bench.sampling [--vocab 49152] [--rows 1 16 32]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from actors.shard.sampler import Sampler, SamplingParams


def per_row_multinomial(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    """The reference: softmax and one multinomial draw per row."""
    return [int(torch.multinomial((logits[r] / p.temperature).softmax(-1), 1)) for r, p in enumerate(params)]


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` calls, in ms (the least disturbed by other work on the box)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    """Print one table row per batch size."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2's by default)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32], help="sampled rows per step")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sampler = Sampler(0)
    print("| rows | Sampler ms | multinomial per row ms | x |\n| ---: | ---: | ---: | ---: |")
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(rows)) * 3
        params = [SamplingParams(temperature=0.8, seed=i if i % 2 else None) for i in range(rows)]
        ours = best_ms(lambda: sampler(logits, params, [0] * rows), args.repeats)
        ref = best_ms(lambda: per_row_multinomial(logits, params), args.repeats)
        print(f"| {rows} | {ours:.2f} | {ref:.2f} | {ref / ours:.1f} |")


if __name__ == "__main__":
    main()
