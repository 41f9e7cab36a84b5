"""Workload shapes of the online comparison (`bench.peer --parts online`) and the `vllm bench serve` runs made of
them: fixed random shapes, a mixed-length set drawn from a seeded log-normal, prompt counts, seeds, the SLO of
the goodput column, and a rough duration estimate printed before a run starts.

Standard library only: the driver imports this and the peer venv's client script receives plain JSON.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

MAX_LEN = 2048  # vLLM's --max-model-len and the clip of the mixed set: prompt + output of any request fit it
# The SLO behind the goodput column (vllm bench serve --goodput, ms): a first token within 2 s and 10 tokens/s per
# stream, faster than anyone reads; a request counts as good only when it meets both.
SLO = {"ttft": 2000.0, "tpot": 100.0}


@dataclass(frozen=True)
class Shape:
    """Prompt and output lengths in tokens; with sigmas > 0 they are the medians of a log-normal per request."""

    name: str
    input_len: int
    output_len: int
    sigma_in: float = 0.0
    sigma_out: float = 0.0

    @property
    def mixed(self) -> bool:
        """Whether lengths vary per request (a `custom` dataset file) instead of vllm's random dataset."""
        return self.sigma_in > 0 or self.sigma_out > 0

    def describe(self) -> str:
        """One line for table titles."""
        if not self.mixed:
            return f"{self.name}: random {self.input_len} in / {self.output_len} out"
        return (f"{self.name}: log-normal lengths, median {self.input_len} in (sigma {self.sigma_in}) / "
                f"{self.output_len} out (sigma {self.sigma_out}), each clipped to [4, {MAX_LEN // 2}]")


# The mixed set's medians and spreads put its means near ShareGPT's as vllm bench serve samples it (about 220
# prompt and 200 output tokens), with the long tail of a chat log; synthesized, so no download.
SHAPES = {s.name: s for s in (
    Shape("short", 128, 64),
    Shape("long-out", 128, 512),
    Shape("long-prompt", 1024, 128),
    Shape("mixed", 118, 120, 1.1, 1.0),
)}
QUICK_SHAPES = ("short", "long-prompt", "mixed")
TINY = Shape("tiny", 128, 128)  # the tiny random model: compute ~0, so this times each server's own overhead


@dataclass(frozen=True)
class Run:
    """One `vllm bench serve` invocation against a running server."""

    shape: Shape
    conc: int
    prompts: int
    seed: int


def prompt_count(conc: int, quick: bool) -> int:
    """Requests per run: 4 for one client (its TPOT settles at once); else two waves of `conc`, so that half the
    requests arrive while others decode, as in service (--quick: one wave, the opening burst only)."""
    if conc == 1:
        return 4
    return conc if quick else 2 * conc


def plan_runs(shapes: list[Shape], concs: list[int], quick: bool, round_no: int) -> list[Run]:
    """Every (shape, concurrency) run of one server start; --quick runs 1 client on the first shape only.
    Seeds depend on round, shape and concurrency, never on the server: every server gets the same prompts,
    and no run in one server's life repeats another's (so prefix caches never hit across runs)."""
    runs = []
    for i, shape in enumerate(shapes):
        for conc in concs:
            if quick and conc == 1 and i > 0:
                continue
            runs.append(Run(shape, conc, prompt_count(conc, quick), 10007 * (round_no + 1) + 101 * i + conc))
    return runs


def mixed_lengths(shape: Shape, n: int, seed: int) -> list[tuple[int, int]]:
    """`n` seeded (prompt, output) lengths from the shape's log-normals, each clipped to [4, MAX_LEN // 2]."""
    rng = random.Random(seed)
    cap = MAX_LEN // 2

    def draw(median: int, sigma: float) -> int:
        return min(cap, max(4, round(rng.lognormvariate(math.log(median), sigma))))

    return [(draw(shape.input_len, shape.sigma_in), draw(shape.output_len, shape.sigma_out)) for _ in range(n)]


def client_args(run: Run, url: str, model: str, tokenizer: str, dataset_path: str) -> list[str]:
    """`vllm bench serve` arguments of one run: streaming /v1/completions, greedy, eos ignored, goodput."""
    args = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", tokenizer, "--num-prompts", str(run.prompts), "--max-concurrency", str(run.conc),
            "--ignore-eos", "--temperature", "0", "--seed", str(run.seed), "--percentile-metrics",
            "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--disable-tqdm",
            "--goodput", *(f"{k}:{v:g}" for k, v in SLO.items())]
    if run.shape.mixed:  # per-request lengths: the custom dataset's JSONL, output length from each line
        return args + ["--dataset-name", "custom", "--dataset-path", dataset_path, "--custom-output-len", "-1",
                       "--skip-chat-template", "--disable-shuffle"]
    return args + ["--dataset-name", "random", "--random-input-len", str(run.shape.input_len),
                   "--random-output-len", str(run.shape.output_len)]


# Rough figures of this 2-core box (SmolLM2 fp32, both engines averaged) for the estimate printed before a run.
GUESS_TOKS = {1: 20.0, 4: 45.0, 16: 90.0, 32: 110.0}
GUESS_PREFILL = 1000.0  # prompt tokens/s


def estimate_s(run: Run) -> float:
    """Seconds one run may take on this box (a guess from GUESS_*; long-tailed mixed runs wait for their longest)."""
    rate = GUESS_TOKS.get(run.conc) or GUESS_TOKS[min(GUESS_TOKS, key=lambda c: abs(c - run.conc))]
    if run.shape.mixed:
        lens = mixed_lengths(run.shape, run.prompts, run.seed)
        tail = max(o for _, o in lens) / GUESS_TOKS[1]  # the longest request, at one stream's speed at best
        return max(sum(o for _, o in lens) / rate, tail) + sum(i for i, _ in lens) / GUESS_PREFILL
    return run.prompts * (run.shape.output_len / rate + run.shape.input_len / GUESS_PREFILL)
