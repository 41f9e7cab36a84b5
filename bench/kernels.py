"""Micro-benchmarks behind the CPU matmul and decode choices, each beside the call it replaces, in one run:
the C few-token matmul vs PyTorch's paths at one to eight tokens; the C many-token matmul vs oneDNN's packed
weights and `F.linear` at 5 to 256 tokens; the split matmul vs `F.linear`; oneDNN's packed
weights vs `F.linear` at prefill sizes; the per-head block gather vs per-token indexing; decode attention in the C
kernel vs gather + matmul; then where the time of one engine step goes at the throughput benchmark's sizes (one
tp=1 shard, no Ray).

python -m bench.kernels          (every table)
python -m bench.kernels plan     (each matmul path per token count on SmolLM2's shapes, and what `matmul_plan` picks)
"""
from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from actors.shard import cpu_gemm, matmul_plan, native, quant
from actors.shard.cpu_gemm import pack, packed_linear
from actors.shard.kv_cache import AttnMeta, PagedKVCache, gathered_decode
from actors.shard.layers import GEMM_MAX_TOKENS, GEMV_MAX_TOKENS
from actors.shard.matmul_plan import split_linear
from actors.shard.runner import ShardPlan, StageRunner, StepInput
from actors.shard.sampler import SamplingParams
from actors.shard.tp import TPGroup
from bench.common import BENCH_MODEL, ensure_model, table

SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048), (32000, 768)]  # bench-125m: qkv, o, gate_up, down, head


def seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median-free mean seconds per call after a warm-up (enough at these sizes and counts)."""
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def matmuls() -> None:
    """F.linear vs the split matmul (`linear` without the C kernels) for the benchmark model's weight shapes at 8 and
    64 tokens (4 weight copies rotate so the weights come from memory, not cache)."""
    rows = []
    for tokens in (8, 64):
        for out_f, in_f in SHAPES:
            x, ws = torch.randn(tokens, in_f), [torch.randn(out_f, in_f) for _ in range(4)]
            i = iter(range(10**9))
            base = seconds(lambda: F.linear(x, ws[next(i) % 4]), 100)
            split = seconds(lambda: split_linear(x, ws[next(i) % 4]), 100)
            gbs = out_f * in_f * 4 / 1e9
            rows.append([tokens, f"{out_f}x{in_f}", gbs / base, gbs / split, base / split])
    table(f"weight matmuls, fp32, {torch.get_num_threads()} threads", ["tokens", "weight", "F.linear GB/s",
          "split GB/s", "speed-up"], rows)


def decode_weights() -> tuple[list[torch.Tensor], list[torch.Tensor | None] | None]:
    """Random weights shaped like bench-125m's whole decode step (12 layers and the LM head, ~400 MB, so each is read
    from memory), and their oneDNN-packed copies where this PyTorch has oneDNN."""
    weights = [torch.randn(o, i) for _ in range(12) for o, i in SHAPES[:4]] + [torch.randn(*SHAPES[4])]
    return weights, ([pack(w) for w in weights] if cpu_gemm.available() else None)


def few_token_matmuls() -> None:
    """Every weight of bench-125m's decode step (12 layers and the LM head, ~400 MB, so each is read from memory)
    at one to eight tokens: the C kernel (`native.gemv`) beside PyTorch's paths, on all threads and on one."""
    weights, packed = decode_weights()
    gbytes = sum(w.numel() for w in weights) * 4 / 1e9
    rows = []
    for n in thread_counts():
        for tokens in (1, 2, 4, 8):
            xs = {i: torch.randn(tokens, i) for i in {w.shape[1] for w in weights}}
            paths = {"F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                     "packed": lambda: [packed_linear(xs[w.shape[1]], p, None) for w, p in zip(weights, packed)],
                     "C kernel": lambda: [native.gemv(xs[w.shape[1]], w) for w in weights]}
            if n > 1:
                paths["split"] = lambda: [split_linear(xs[w.shape[1]], w) for w in weights]
            ms = {name: min(seconds(fn, 3) for _ in range(3)) * 1e3 for name, fn in paths.items()
                  if packed is not None or name != "packed"}
            best_torch = min(v for k, v in ms.items() if k != "C kernel")
            rows.append([n, tokens, *(f"{ms[k]:.1f}" if k in ms else "-" for k in ("F.linear", "split", "packed")),
                         f"{ms['C kernel']:.1f}", gbytes / ms["C kernel"] * 1e3, best_torch / ms["C kernel"]])
    table(f"few-token matmul, bench-125m's decode weights ({gbytes * 1e3:.0f} MB), ms per step",
          ["threads", "tokens", "F.linear", "split", "packed", "C kernel", "C GB/s", "vs best torch"], rows,
          [f"linear() takes the C kernel up to {GEMV_MAX_TOKENS} tokens"])


def batch_matmuls() -> None:
    """bench-125m's decode weights (as in few_token_matmuls) at 5 to 256 tokens, GFLOP/s: the C register-blocked
    kernel (`native.gemm`) beside oneDNN's packed layout and F.linear, on all threads and on one."""
    weights, packed = decode_weights()
    flop = 2 * sum(w.numel() for w in weights) / 1e9
    rows = []
    for n in thread_counts():
        for tokens in (5, 8, 16, 32, 64, 128, 256):
            xs = {i: torch.randn(tokens, i) for i in {w.shape[1] for w in weights}}
            paths = {"F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                     "C kernel": lambda: [native.gemm(xs[w.shape[1]], w) for w in weights]}
            if packed is not None:
                paths["packed"] = lambda: [packed_linear(xs[w.shape[1]], p, None) for w, p in zip(weights, packed)]
            gflops = {name: tokens * flop / min(seconds(fn, 2) for _ in range(3)) for name, fn in paths.items()}
            best_torch = max(v for k, v in gflops.items() if k != "C kernel")
            rows.append([n, tokens, *(f"{gflops[k]:.0f}" if k in gflops else "-" for k in ("F.linear", "packed")),
                         f"{gflops['C kernel']:.0f}", gflops["C kernel"] / best_torch])
    table("many-token matmul, bench-125m's decode weights, GFLOP/s", ["threads", "tokens", "F.linear", "packed",
          "C kernel", "vs best torch"], rows,
          [f"linear() takes the C kernel from {GEMV_MAX_TOKENS + 1} to {GEMM_MAX_TOKENS} tokens"])


def thread_counts() -> Iterator[int]:
    """Run the loop body on all threads, then on one (a tp=2 worker's share of this box); restores the count."""
    threads = torch.get_num_threads()
    try:
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            yield n
    finally:
        torch.set_num_threads(threads)


def prefill_matmuls() -> None:
    """oneDNN's packed weight vs `F.linear` on the plain one, GFLOP/s at prefill-sized token counts, on all threads
    and on one (a tp=2 worker's share of this box); `linear` takes the plain copy above SPLIT_MAX_TOKENS on 2+."""
    if not cpu_gemm.available():
        print("prefill weight matmuls: skipped, this PyTorch build has no oneDNN")
        return
    rows = []
    for n in thread_counts():
        for tokens in (128, 512, 2048):
            for out_f, in_f in SHAPES[:4]:
                x, w = torch.randn(tokens, in_f), torch.randn(out_f, in_f)
                packed = pack(w)
                assert packed is not None, "oneDNN is available but refused to pack"
                flops = 2 * tokens * out_f * in_f / 1e9
                plain = seconds(lambda: F.linear(x, w), 10)
                onednn = seconds(lambda: packed_linear(x, packed, None), 10)
                rows.append([n, tokens, f"{out_f}x{in_f}", flops / plain, flops / onednn, plain / onednn])
    table("prefill weight matmuls, fp32, GFLOP/s", ["threads", "tokens", "weight", "F.linear", "packed",
          "packed speed-up"], rows)


def gathers() -> None:
    """Decode gather of a batch's K: per-token fancy indexing of a token-major cache (the previous layout) vs
    the head-major cache's whole-block gather, 64 sequences x 192 tokens, 4 KV heads of 64."""
    b, ctx, heads, d, bs, nblocks = 64, 192, 4, 64, 16, 64 * 20
    tables = torch.stack([torch.randperm(nblocks)[:ctx // bs] for _ in range(b)])  # [B, blocks per sequence]
    slots = (tables[:, :, None] * bs + torch.arange(bs)).reshape(b, -1)
    token_major = torch.randn(nblocks * bs, heads, d)
    cache = PagedKVCache(1, nblocks, bs, heads, d, torch.float32, torch.device("cpu"))
    old = seconds(lambda: token_major[slots], 50)
    new = seconds(lambda: cache.gather_blocks(0, tables.flatten()), 50) / 2  # it gathers K and V
    mib = b * ctx * heads * d * 4 / 2**20
    table(f"decode K gather ({mib:.0f} MiB)", ["method", "ms", "speed-up"],
          [["token-major cache, K[slots]", 1000 * old, 1.0], ["head-major cache, per-head block index_select",
                                                               1000 * new, old / new]])


def decode_attention() -> None:
    """One layer's decode attention for 64 sequences over scattered blocks: the C kernel reading blocks in place
    vs gathering them and two batched matmuls; bench-125m's heads (12 / 4 KV) and a tp=2 worker's (6 / 2)."""
    if not native.available():
        print("decode attention: skipped, the C kernel did not build here")
        return
    rows = []
    for n in thread_counts():
        for heads, kv_heads in ((12, 4), (6, 2)):
            for ctx in (192, 256):
                b, d, bs = 64, 64, 16
                per_seq = ctx // bs
                cache = PagedKVCache(1, b * per_seq, bs, kv_heads, d, torch.float32, torch.device("cpu"))
                cache.kv.normal_()
                tables = torch.randperm(b * per_seq).view(b, per_seq).tolist()  # blocks anywhere, as after churn
                meta = AttnMeta.build([1] * b, [ctx] * b, tables, bs, None, torch.device("cpu"))
                q = torch.randn(b, heads, d)
                kernel = seconds(lambda: native.paged_decode(q, cache.k[0], cache.v[0], meta.decode_blocks.view(b, -1),
                                                             meta.decode_lens, bs, None, 0.125), 20)
                gather = seconds(lambda: gathered_decode(q, cache, 0, meta, 0.125), 20)
                gbs = cache.kv.numel() * 4 / 1e9  # K and V of every sequence, read once
                rows.append([n, f"{heads}/{kv_heads}", ctx, 1000 * gather, 1000 * kernel, gbs / kernel,
                             gather / kernel])
    table("decode attention, one layer, 64 sequences, fp32", ["threads", "heads/kv", "context", "gather+bmm ms",
          "C kernel ms", "kernel GB/s", "speed-up"], rows)


def step_anatomy() -> None:
    """One bench-125m shard: a 1024-token prefill chunk (8 prompts of 128) and batch-64 decode steps at contexts
    160 and 256, each with its share in weight/attention matmuls; plus a 2048^2 matmul as the cores' peak."""
    runner = StageRunner(ShardPlan(ensure_model(BENCH_MODEL), 0, 1, 0, 1, None, 512, 16), TPGroup.single(),
                         torch.device("cpu"))
    runner.allocate_cache(64 * 16)
    tables, greedy = [list(range(16 * i, 16 * i + 16)) for i in range(64)], SamplingParams(temperature=0.0)

    def prefill(first: int) -> StepInput:
        seqs = range(first, first + 8)
        return StepInput(np.arange(8 * 128) % 30000 + 10, np.tile(np.arange(128), 8), [128] * 8, [128] * 8,
                         [tables[i] for i in seqs], [greedy] * 8, [0] * 8)

    def decode(ctx: int, seqs: int = 64) -> StepInput:
        return StepInput(np.arange(seqs) + 10, np.full(seqs, ctx - 1), [1] * seqs, [ctx] * seqs, tables[:seqs],
                         [greedy] * seqs, [1] * seqs)

    rows = []
    for name, steps in (("prefill chunk, 8 x 128 tokens", [prefill(8 * i) for i in range(8)]),
                        ("decode, 64 sequences, context 160", [decode(160)] * 4),
                        ("decode, 64 sequences, context 256", [decode(256)] * 4),
                        ("decode, 1 sequence, context 64", [decode(64, 1)] * 11)):
        runner.execute(steps[0])  # warm-up
        with torch.profiler.profile() as prof:
            start = time.perf_counter()
            for step in steps[1:]:
                runner.execute(step)
            wall = (time.perf_counter() - start) / (len(steps) - 1)
        mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm"))
        calls = sum(e.count for e in prof.key_averages()) / (len(steps) - 1)  # every aten call, nested included
        rows.append([name, 1000 * wall, f"{100 * mm / 1e6 / (wall * (len(steps) - 1)):.0f}%", f"{calls:.0f}"])
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048**3 / seconds(lambda: a @ b, 5) / 1e9
    table(f"engine step anatomy, one tp=1 shard in process (profiled); square 2048 matmul peak {peak:.0f} GFLOP/s",
          ["step", "ms", "in aten matmuls", "aten calls"], rows,
          ["the C kernels (weight matmuls up to 256 tokens, decode attention, RMSNorm) are ctypes calls the profiler "
           "does not see"])


SMOL_SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M: qkv, gate_up, down, head
SMOL_QTYPES = {49152: "Q8_0"}  # the bundled GGUF's block types by rows (the tied head is its Q8_0 embedding)


def plan_paths() -> None:
    """GFLOP/s of every matmul path `matmul_plan` times, on SmolLM2's weights (as the bundled GGUF's blocks for
    'quant'), beside the plan it picks for each (timed apart from the table, as a worker does when it loads)."""
    paths = matmul_plan.candidates(packed=True) + (["quant"] if quant.available() else [])
    rows = []
    for out, width in SMOL_SHAPES:
        qtype = SMOL_QTYPES.get(out, "Q4_1")
        plan = matmul_plan.calibrate(width, out, paths, qtype=qtype)
        w = torch.randn(out, width)
        packed, blocks = pack(w), quant.quantize(w, qtype)
        for tokens in (1, 4, 16, 32, 64, 256, 2048):
            x, flop = torch.randn(tokens, width), 2 * tokens * out * width
            reps = max(2, int(2e8 / flop))
            rate = {p: flop / seconds(lambda p=p: matmul_plan.run(p, x, w, None, packed, blocks), reps) / 1e9
                    for p in paths}
            best = max(rate, key=lambda p: rate[p])
            rows.append([f"{out}x{width}", tokens, *(f"{rate[p]:.0f}" for p in paths), best, plan.path(tokens)])
    table(f"matmul paths, {torch.get_num_threads()} threads, GFLOP/s", ["weight", "tokens", *paths, "fastest",
                                                                          "plan"], rows)


def main() -> None:
    """All tables (or, with the argument `plan`, the matmul paths alone), with the machine line."""
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; torch {torch.__version__}")
    with torch.inference_mode():
        if sys.argv[1:] == ["plan"]:
            plan_paths()
            return
        few_token_matmuls()
        batch_matmuls()
        matmuls()
        prefill_matmuls()
        gathers()
        decode_attention()
        step_anatomy()


if __name__ == "__main__":
    main()
