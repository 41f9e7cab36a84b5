"""Multi-LoRA step cost: one decode step of N sequences on the base model vs the same step with every sequence on
one adapter vs spread over several adapters (the mixed batch multi-LoRA serves in one step), on one in-process
shard (no Ray, no engine: the step itself).

python -m bench.lora [--model models/bench-125m] [--seqs 16] [--adapters 3] [--rank 16] [--rounds 15]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from actors.shard import lora
from actors.shard.lora_files import TARGETS, module_shape
from actors.shard.runner import ShardPlan, StageRunner, StepInput
from actors.shard.sampler import SamplingParams
from actors.shard.spec import ModelSpec
from actors.shard.tp import TPGroup
from bench.common import BENCH_MODEL, CORES, ensure_model, model_info, table

BLOCK = 16
CONTEXT = 128  # tokens already in each sequence's cache when the timed decode steps run


def write_random_adapter(out: Path, spec: ModelSpec, rank: int, seed: int) -> Path:
    """A PEFT-layout LoRA of every q/k/v/o/gate/up/down projection with random A and B (peft is not needed)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for module, (parent, _, _) in TARGETS.items():
            rows, cols = module_shape(spec, module)
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, cols, generator=gen) / cols ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) / rank ** 0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                         "target_modules": list(TARGETS)}))
    return out


def decode_step(seqs: int, slots: list[int | None], vocab: int) -> StepInput:
    """One decode token per sequence at position CONTEXT (sequence i owns blocks i*B .. (i+1)*B - 1)."""
    per = -(-(CONTEXT + 1) // BLOCK)
    return StepInput(np.arange(seqs, dtype=np.int64) % vocab, np.full(seqs, CONTEXT, dtype=np.int64), [1] * seqs,
                     [CONTEXT + 1] * seqs, [list(range(i * per, (i + 1) * per)) for i in range(seqs)],
                     [SamplingParams(temperature=0.0)] * seqs, [0] * seqs,
                     lora=slots if any(s is not None for s in slots) else None)


def time_cases(cases: list[tuple[StageRunner, StepInput]], rounds: int) -> list[float]:
    """Median milliseconds per step of each (runner, step), timed in interleaved rounds (so load from other
    processes on the box hits every case alike), after one warm-up round."""
    samples: list[list[float]] = [[] for _ in cases]
    for r in range(rounds + 1):
        for k, (runner, step) in enumerate(cases):
            for _ in range(3):
                start = time.perf_counter()
                runner.execute(step)
                if r:
                    samples[k].append(time.perf_counter() - start)
    return [1000 * statistics.median(s) for s in samples]


def make_runner(model: str, seqs: int, max_loras: int, rank: int) -> StageRunner:
    """One whole-model shard with a KV cache for `seqs` sequences of CONTEXT + 1 tokens."""
    plan = ShardPlan(model, 0, 1, 0, 1, "float32", max_model_len=CONTEXT + 16, block_size=BLOCK,
                     max_loras=max_loras, max_lora_rank=rank)
    runner = StageRunner(plan, TPGroup.single(), torch.device("cpu"))
    runner.allocate_cache(seqs * -(-(CONTEXT + 1) // BLOCK))
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BENCH_MODEL, help="local model folder (a random one is written if absent)")
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of 3 steps per case")
    args = parser.parse_args()
    model = ensure_model(args.model)
    torch.set_num_threads(CORES)
    spec = ModelSpec.from_dir(model)
    runner = make_runner(model, args.seqs, args.adapters, args.rank)
    plain = make_runner(model, args.seqs, 0, args.rank)  # LoRA off: what every row is compared with
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.adapters):
            runner.load_lora(k, f"a{k}", str(write_random_adapter(Path(tmp) / f"a{k}", spec, args.rank, k)))
    n, a = args.seqs, args.adapters
    cases = [("LoRA on, no adapter in the batch", [None] * n),
             ("one adapter for every sequence", [0] * n),
             (f"{a} adapters + base, mixed", [None if i % (a + 1) == a else i % (a + 1) for i in range(n)]),
             (f"{a} adapters, mixed", [i % a for i in range(n)])]
    steps = [decode_step(n, slots, spec.vocab_size) for _, slots in cases]
    labels = ["LoRA off (max_loras 0)", *(label for label, _ in cases)]
    ms = time_cases([(plain, steps[0]), *((runner, step) for step in steps)], args.rounds)
    masked, lora.MASKED_MAX_ADAPTERS = lora.MASKED_MAX_ADAPTERS, 0  # the per-adapter gather/scatter path
    ms += time_cases([(plain, steps[0]), (runner, steps[-1])], args.rounds)[1:]
    lora.MASKED_MAX_ADAPTERS = masked
    labels.append(f"{a} adapters, mixed, grouped per adapter")
    rows: list[list[object]] = [[label, t, t / ms[0]] for label, t in zip(labels, ms)]
    table(f"LoRA decode step: {n} sequences, rank {args.rank}, {model_info(model)}, {CORES} torch threads",
          ["batch", "ms/step", "vs LoRA off"], rows,
          [f"median of {3 * args.rounds} steps per case, interleaved over {args.rounds} rounds; context "
           f"{CONTEXT} tokens per sequence; every adapter targets q/k/v/o/gate/up/down"])


if __name__ == "__main__":
    main()
