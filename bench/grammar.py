"""Structured-output cost: decode steps at batch 32 with every row under a JSON-schema grammar vs free rows,
same model, same run; plus the grammar-mask time alone. A step is timed as the engine runs it: schedule and build
it (the scheduler's matchers make the bitmasks), execute it, apply its tokens (the matchers advance).

python -m bench.grammar [--batch 32] [--steps 24] [--vocab 32000]

The model is the seeded bench-125m; its tokenizer is a byte-level BPE of `--vocab` tokens trained here on the
Python standard library's sources (a realistic vocabulary size and token mix: quotes, braces, digits, words).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from actors.shard.runner import ShardPlan, StageRunner
from actors.shard.sampler import SamplingParams
from actors.shard.tp import TPGroup
from bench.common import model_info, table
from cluster.blocks import BlockManager
from cluster.scheduler import Scheduler, Sequence
from cluster.structured import GrammarMatchers, GrammarSpec

ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "kind": {"enum": ["cat", "dog", "fox"]},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}}},
        "required": ["name", "kind", "age"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM}  # never forced to end: every step of the run is a constrained step


def train_tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE of `vocab` tokens over the standard library's .py files, saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(os.path.dirname(json.__file__)).parent.glob("*.py"))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)


def ensure_model(path: Path, vocab: int) -> str:
    """bench-125m with a trained `vocab`-token tokenizer (written once)."""
    from deployments.make_model import write_model

    if not (path / "tokenizer.json").is_file():
        write_model(path, preset="bench-125m", tokenizer=False, vocab_size=vocab)
        train_tokenizer(path, vocab)
    return str(path)


def new_batch(runner: StageRunner, matchers: GrammarMatchers, batch: int, steps: int, spec: GrammarSpec | None,
              seq0: int, blocks: range) -> Scheduler:
    """A scheduler of `batch` sequences that uses only cache `blocks`, every row under `spec` if given."""
    manager = BlockManager(runner.cache.num_blocks, runner.plan.block_size, False)
    manager.free = list(reversed(blocks))  # two batches share one cache without sharing blocks
    sched = Scheduler(manager, batch, 4096, 512, matchers)
    params = SamplingParams(temperature=1.0, seed=1)
    for i in range(batch):
        sched.add(Sequence(seq0 + i, [10 + i, 20, 30, 40, 50, 60, 70, 80], params, steps + 2, grammar=spec))
    return sched


def one_step(runner: StageRunner, sched: Scheduler) -> float:
    """Schedule, build, run and apply the scheduler's next step; returns its seconds."""
    start = time.perf_counter()
    seqs = sched.schedule()
    out = runner.execute(sched.build_step(seqs))
    sched.update(seqs, out)
    return time.perf_counter() - start


def paired_times(runner: StageRunner, matchers: GrammarMatchers, batch: int, steps: int, spec: GrammarSpec,
                 seq0: int, constrained_first: bool = False) -> tuple[list[float], list[float]]:
    """Decode-step seconds of a free batch and a constrained batch, stepped alternately (same conditions)."""
    half = runner.cache.num_blocks // 2  # each batch gets its own half of the cache
    free = new_batch(runner, matchers, batch, steps, None, seq0, range(half))
    constrained = new_batch(runner, matchers, batch, steps, spec, seq0 + batch, range(half, 2 * half))
    times: tuple[list[float], list[float]] = ([], [])
    for k in range(steps + 1):
        pair = ((free, times[0]), (constrained, times[1]))
        for sched, sink in reversed(pair) if constrained_first else pair:
            took = one_step(runner, sched)
            if k:  # step 0 is the prefill
                sink.append(took)
    for sched in (free, constrained):
        for seq in list(sched.running):
            sched.retire(seq)
    return times


def timed(fn: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    """`fn`, recording each call's seconds into `sink`."""
    def wrapper(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            sink.append(time.perf_counter() - start)
    return wrapper


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    path = ensure_model(Path(f"models/bench-125m-v{args.vocab}"), args.vocab)
    plan = ShardPlan(path, 0, 1, 0, 1, max_model_len=512, block_size=16)
    runner = StageRunner(plan, TPGroup.single(), torch.device("cpu"))
    runner.allocate_cache(2 * args.batch * 4 + 8)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    matchers = GrammarMatchers(tokenizer, runner.spec.vocab_size, runner.spec.eos_token_ids)
    mask_s: list[float] = []
    masks: list[float] = []
    matchers.masks = timed(matchers.masks, mask_s)  # type: ignore[method-assign]  # the matchers' work per step
    start = time.perf_counter()
    matchers.start(-1, spec)
    matchers.release(-1)
    compile_s = time.perf_counter() - start  # includes llguidance's tokenizer setup (once per process)
    paired_times(runner, matchers, args.batch, 4, spec, 90_000)  # warm-up: allocator, caches, lazy lexer states
    mask_s.clear()
    free, constrained = [], []
    for r in range(args.rounds):
        n = len(mask_s)
        f, c = paired_times(runner, matchers, args.batch, args.steps, spec, 10_000 * r, constrained_first=r % 2 == 1)
        free, constrained, masks = free + f, constrained + c, masks + mask_s[n + 1:]  # mask 0 came with the prefill
    f, c, m = (statistics.median(x) * 1e3 for x in (free, constrained, masks))
    rows = [["free rows", f, "-", "-"], ["every row JSON schema", c, m, f"{100 * (c - f) / f:+.1f}%"]]
    table(f"Grammar masks: decode step at batch {args.batch} ({args.rounds} x {args.steps} steps each, stepped "
          "alternately, medians)",
          ["run", "step ms", "mask ms (scheduler)", "step cost"], rows,
          [f"model: {model_info(path)}; tokenizer: byte-level BPE, {len(tokenizer)} tokens",
           f"mask alone = {100 * m / f:.1f}% of a free step; first compile + tokenizer setup {compile_s:.2f} s",
           f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
           f"{torch.get_num_threads()}, python {sys.version.split()[0]}, llguidance (LLExecutor, 2 threads)"])


if __name__ == "__main__":
    main()
