"""Detokenization cost of one long output, both ways in one run: decoding the whole id list on every new token
(what the text stream did before) vs `cluster.detokenize.IncrementalDecoder` (a short window per token).

python -m bench.detokenize [--tokens 2000]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import table
from cluster.detokenize import IncrementalDecoder
from deployments.make_model import CORPUS, write_tokenizer


def output_ids(tokenizer: Any, n: int) -> list[int]:
    """`n` token ids of natural text (the bundled corpus, repeated), as a model would emit them."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(CORPUS, add_special_tokens=False)
    return ids[:n]


def whole_decode(tokenizer: Any, ids: list[int]) -> tuple[str, list[float]]:
    """Before: decode every prefix; returns the text and the seconds each token cost."""
    costs, text = [], ""
    for k in range(1, len(ids) + 1):
        start = time.perf_counter()
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        costs.append(time.perf_counter() - start)
    return text, costs


def incremental(tokenizer: Any, ids: list[int]) -> tuple[str, list[float]]:
    """After: one IncrementalDecoder step per token."""
    decoder, costs = IncrementalDecoder(tokenizer), []
    for token in ids:
        start = time.perf_counter()
        decoder.step(token)
        costs.append(time.perf_counter() - start)
    return decoder.text, costs


def best_of(fn: Callable[[Any, list[int]], tuple[str, list[float]]], tokenizer: Any, ids: list[int],
            repeat: int) -> tuple[str, list[float]]:
    """The run with the least total time of `repeat` runs."""
    return min((fn(tokenizer, ids) for _ in range(repeat)), key=lambda r: sum(r[1]))


def main() -> None:
    """Print the before/after table."""
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), 1024)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    ids = output_ids(tokenizer, args.tokens)
    rows, texts = [], []
    for name, fn in (("whole list per token (before)", whole_decode), ("IncrementalDecoder (after)", incremental)):
        text, costs = best_of(fn, tokenizer, ids, args.repeat)
        texts.append(text)
        last = costs[-100:]
        rows.append([name, 1000 * sum(costs), 1e6 * sum(costs[:100]) / 100, 1e6 * sum(last) / len(last)])
    assert texts[0] == texts[1], "the incremental text differs from the whole decode"
    rows[1].append(rows[0][1] / rows[1][1])
    rows[0].append(1.0)
    table(f"Detokenizing one {args.tokens}-token output", ["method", "total ms", "us/token (first 100)",
                                                           "us/token (last 100)", "speed-up"], rows,
          [f"bundled byte-level BPE tokenizer (vocab 1024), best of {args.repeat}; same text both ways",
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"])


if __name__ == "__main__":
    main()
