"""The real bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32) in every layout it splits into,
beside Hugging Face `generate` on the same dequantized weights, in the same run: decode tokens/s at batch 1 and
with 32 concurrent streams. Each figure is the difference of two output lengths, so start-up and prefill cancel.

python -m bench.real_model [--layouts 1x1 1x2 3x1 3x2] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import ray
import torch

from actors.shard.checkpoint import model_spec
from bench.common import CORES, make_grid, table
from bench.engine import run_streams
from deployments import smollm2


def token_prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    """`n` distinct deterministic prompts of `length` ids (eos ignored, so content does not matter)."""
    return [[(7 * i + 13 * r + 3) % (vocab - 100) + 100 for i in range(length)] for r in range(n)]


def hf_rates(model: str, workloads: dict[str, list[list[int]]], short: int, long: int) -> dict[str, float]:
    """HF greedy `generate` of each workload's whole batch at once: decode tokens/s from two output lengths."""
    import transformers

    gguf = next(p.name for p in os.scandir(model) if p.name.endswith(".gguf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, gguf_file=gguf, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None

    def timed(ids: torch.Tensor, n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),  # noqa: F821 (deleted after the last call)
                        do_sample=False, max_new_tokens=n,
                        min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - start

    rates = {}
    for name, reqs in workloads.items():
        ids = torch.tensor(reqs)
        timed(ids, 2)  # warm-up
        rates[name] = len(reqs) * (long - short) / (timed(ids, long) - timed(ids, short))
    del hf
    gc.collect()
    return rates


def ours_rate(model: str, tp: int, pp: int, reqs: list[list[int]], short: int, long: int) -> tuple[float, float]:
    """gridserve over a tp x pp CPU grid: (decode tokens/s from two output lengths, GGUF load seconds)."""
    start = time.perf_counter()
    grid = make_grid(model, tp, pp, kv_mib=128)
    load = time.perf_counter() - start
    try:
        wall_short, _, _ = run_streams(grid, reqs, short)
        wall_long, _, _ = run_streams(grid, reqs, long)
    finally:
        grid.shutdown()
    return len(reqs) * (long - short) / (wall_long - wall_short), load


def main() -> None:
    """Print one table: each layout and HF, batch 1 and 32 streams, with ratios to HF."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layouts", nargs="+", default=["1x1", "1x2", "3x1", "3x2"], help="TPxPP layouts")
    ap.add_argument("--quick", action="store_true", help="shorter outputs (a smoke run, noisier)")
    a = ap.parse_args()
    model = str(smollm2.fetch("models"))
    spec = model_spec(model)
    short, long = (8, 24) if a.quick else (16, 64)
    workloads = {"batch 1": token_prompts(1, 32, spec.vocab_size), "32 streams": token_prompts(32, 64, spec.vocab_size)}
    ray.init(num_cpus=CORES, include_dashboard=False, _node_ip_address="127.0.0.1")
    rows = []
    try:
        ref = hf_rates(model, workloads, short, long)
        rows.append([f"HF generate ({CORES} threads)", ref["batch 1"], 1.0, ref["32 streams"], 1.0, "-"])
        for layout in a.layouts:
            tp, pp = (int(x) for x in layout.split("x"))
            r1, load = ours_rate(model, tp, pp, workloads["batch 1"], short, long)
            r32, _ = ours_rate(model, tp, pp, workloads["32 streams"], short, long)
            rows.append([f"gridserve tp={tp} pp={pp}", r1, r1 / ref["batch 1"], r32, r32 / ref["32 streams"], load])
    finally:
        ray.shutdown()
    table(f"Real model: {spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_heads}/{spec.num_kv_heads} "
          f"heads, vocab {spec.vocab_size}, fp32 (from Q4_1)",
          ["system", "batch 1 tok/s", "vs HF", "32 streams tok/s", "vs HF", "grid start s"], rows,
          [f"{platform.processor() or platform.machine()}, {CORES} cores, torch {torch.__version__}; greedy, eos "
           f"ignored; decode tokens/s = tokens between {short} and {long} new per stream / time difference. "
           "Prompts 32 (batch 1) and 64 tokens (32 streams). Grid start = placement + GGUF read and dequantize "
           "per rank + KV allocation. Workers split the cores evenly."])


if __name__ == "__main__":
    main()
