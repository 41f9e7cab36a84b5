"""Which CPU path runs an fp32 linear of T tokens, chosen by timing every path on this machine when a worker loads.

The fastest path depends on the CPU more than on the model: on an AVX2-only EPYC the C kernels (`native.gemv` /
`native.gemm`) beat oneDNN's packed GEMM and PyTorch's BLAS at every decode size, while on an AVX-512 Xeon oneDNN
runs 16-64 tokens 1.2-2.2x as fast as the AVX2 kernels (BENCHMARKS.md, "Kernels"). Fixed thresholds fit one
machine; a few hundred timed calls at load fit the one the worker runs on.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from actors.shard import cpu_gemm, native, plan_times, quant
from actors.shard.quant import QuantWeight

log = logging.getLogger(__name__)
Path = Literal["gemv", "gemm", "packed", "split", "torch", "quant"]
PlanKey = tuple[int, int] | tuple[int, int, str]  # a weight shape [out, in], and its GGUF type where kept as blocks
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # token counts timed; a count runs on its bucket's winner
ROUNDS = 4  # interleaved rounds per bucket: the least time of each path counts (other processes preempt some)
MIN_CALL_S = 2e-3  # calls per timing: enough to fill this, so the clock's resolution does not decide
MAX_ELEMENTS = 2**26  # calibration weight size, at most (256 MiB): whole for small models' LM heads, which stream
PASS_MAX_TOKENS = 32  # buckets up to this many tokens also get a whole-model pass (_blocks_by_pass)
MAX_CALL_FLOP = 8e9  # larger buckets are not timed: they keep the last timed winner among torch / packed


@dataclass(frozen=True)
class MatmulPlan:
    """The path per token-count bucket: `paths[i]` runs counts up to `bounds[i]`; larger counts run `paths[-1]`."""

    bounds: tuple[int, ...]
    paths: tuple[Path, ...]

    def path(self, tokens: int) -> Path:
        """The path for a linear of `tokens` tokens."""
        return self.paths[min(bisect.bisect_left(self.bounds, tokens), len(self.paths) - 1)]

    @property
    def needs_packed(self) -> bool:
        """Whether some bucket runs oneDNN's packed weight."""
        return "packed" in self.paths

    @property
    def needs_plain(self) -> bool:
        """Whether some bucket reads the plain [out, in] weight."""
        return any(p != "packed" for p in self.paths)

    def describe(self) -> str:
        """One line for logs and /status, e.g. '1-2 torch, 3-4 gemv, 5-512+ packed'."""
        parts, lo = [], 1
        for i, (bound, path) in enumerate(zip(self.bounds, self.paths)):
            last = i == len(self.paths) - 1
            if not last and self.paths[i + 1] == path:
                continue
            span = f"{lo}" if lo == bound else f"{lo}-{bound}"
            parts.append(f"{span}{'+' if last else ''} {path}")
            lo = bound + 1
        return ", ".join(parts)


def plan_linears(model: nn.Module, mode: cpu_gemm.CpuWeights) -> dict[PlanKey, MatmulPlan]:
    """With 'auto': time every path here for each large fp32 weight shape of `model`, give each linear its shape's plan,
    and pack a weight for oneDNN only where its plan runs it (its plain copy kept while other token counts still
    run on it and all such copies cost at most cpu_gemm.KEEP_PLAIN_MAX_BYTES). Other modes keep their fixed layout
    (`cpu_gemm.pack_linears`) and get no plan. Returns the plans by weight shape [out, in]."""
    # Smaller weights (a tiny model's) keep layers.linear's fixed paths: timing them would cost more than it wins.
    linears = [(m, w) for m in model.modules() if hasattr(m, "plan") and isinstance(w := getattr(m, "weight", None),
               nn.Parameter) and w.dim() == 2 and w.numel() >= cpu_gemm.PACK_MIN_ELEMENTS
               and w.dtype == torch.float32]
    if mode != "auto" or not linears:
        cpu_gemm.pack_linears(model, mode)
        _drop_unused_copies(model)
        return {}
    targets = cpu_gemm.pack_targets(model)
    packable = {id(m) for m, _ in targets}
    plans: dict[PlanKey, MatmulPlan] = {}
    plan_of: dict[int, MatmulPlan] = {}
    key_of: dict[int, PlanKey] = {}
    for m, w in linears:
        rows, width = w.shape
        blocks: QuantWeight | None = getattr(m, "quant", None)
        qtype = blocks.qtype if blocks is not None and quant.available() else None
        key: PlanKey = (rows, width) if qtype is None else (rows, width, qtype)
        if key not in plans:
            paths = tuple(candidates(id(m) in packable)) + (("quant",) if qtype else ())
            plans[key] = _calibrated(width, rows, paths, torch.get_num_threads(), qtype)
        plan_of[id(m)], key_of[id(m)] = plans[key], key
        setattr(m, "plan", plans[key])  # noqa: B010 (nn.Module's __setattr__ is typed for tensors/modules)
    both = [(m, w) for m, w in targets if plan_of[id(m)].needs_packed and plan_of[id(m)].needs_plain]
    only = [(m, w) for m, w in targets if plan_of[id(m)].needs_packed and not plan_of[id(m)].needs_plain]
    cpu_gemm.pack_into(model, both, cpu_gemm.weight_bytes(both) <= cpu_gemm.KEEP_PLAIN_MAX_BYTES)
    cpu_gemm.pack_into(model, only, keep=False)  # a freed plain copy: every count runs oneDNN's (layers.linear)
    plans = _blocks_by_pass([m for m, _ in linears], plans, key_of)
    _drop_unused_copies(model)
    log.info("matmul paths by tokens per step, %d threads: %s", torch.get_num_threads(), describe(plans))
    return plans


def _blocks_by_pass(mods: list[nn.Module], plans: dict[PlanKey, MatmulPlan],
                    key_of: dict[int, PlanKey]) -> dict[PlanKey, MatmulPlan]:
    """Per bucket up to PASS_MAX_TOKENS, time one pass over every planned linear in model order (what a step reads)
    on their timed plans and with each linear that has blocks on them; where the blocks' pass is faster (the least of
    every start's, plan_times), their plans run the blocks there. A step reads every weight once, from memory, which
    timing one weight again and again (in cache) does not show."""
    if not any(getattr(m, "quant", None) is not None for m in mods):
        return plans
    bounds = next(iter(plans.values())).bounds
    buckets = [t for t in bounds if t <= PASS_MAX_TOKENS]
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"timed": [], "blocks": []}
    for tokens in buckets:
        xs = {key[1]: torch.randn(tokens, key[1], generator=gen) for key in plans}
        best = dict.fromkeys(times, float("inf"))
        for _ in range(ROUNDS):
            for variant in best:
                start = time.perf_counter()
                for m in mods:
                    weight, packed = cast(torch.Tensor, m.weight), cast("torch.Tensor | None", m.packed)
                    blocks, plan = getattr(m, "quant", None), cast(MatmulPlan, m.plan)
                    path = "quant" if variant == "blocks" and blocks is not None else plan.path(tokens)
                    run(resolve(path, weight, packed, blocks), xs[key_of[id(m)][1]], weight, None, packed, blocks)
                best[variant] = min(best[variant], time.perf_counter() - start)
        for variant, seconds in best.items():
            times[variant].append(seconds)
    entry = "step pass " + "; ".join(f"{k}" for k in sorted(plans, key=str)) + f" threads={torch.get_num_threads()}"
    times = plan_times.merged(entry, times)
    faster = [i for i in range(len(buckets)) if times["blocks"][i] < times["timed"][i]]
    out = {key: MatmulPlan(plan.bounds, tuple("quant" if i in faster else p for i, p in enumerate(plan.paths)))
           if len(key) > 2 else plan for key, plan in plans.items()}
    for m in mods:
        setattr(m, "plan", out[key_of[id(m)]])  # noqa: B010 (nn.Module's __setattr__ is typed for tensors/modules)
    return out


def resolve(path: Path, weight: torch.Tensor, packed: torch.Tensor | None, blocks: QuantWeight | None) -> Path:
    """`path`, or the path that runs the copy this linear has where the plan's copy is absent."""
    if path == "packed" and packed is None:
        return "torch"
    if path == "quant" and blocks is None:
        return "torch"
    if path != "packed" and weight.numel() == 0 and packed is not None:
        return "packed"  # the plain copy was freed: oneDNN's is the only one
    return path


def _drop_unused_copies(model: nn.Module) -> None:
    """Free the GGUF blocks of every linear whose plan never runs them (or that has no plan: fixed paths), and the
    packed copy where the plan moved its token counts onto the blocks and the plain copy is still there."""
    for m in model.modules():
        plan = getattr(m, "plan", None)
        if getattr(m, "quant", None) is not None and (plan is None or "quant" not in plan.paths):
            setattr(m, "quant", None)  # noqa: B010 (nn.Module's __setattr__ is typed for tensors/modules)
        weight = getattr(m, "weight", None)
        if (plan is not None and getattr(m, "packed", None) is not None and not plan.needs_packed
                and isinstance(weight, torch.Tensor) and weight.numel()):
            setattr(m, "packed", None)  # noqa: B010


def describe(plans: dict[PlanKey, MatmulPlan]) -> str:
    """Each weight shape's plan on one line, e.g. '3072x576: 1-2 torch, 3-8 gemv, 9+ packed; 576x576 Q4_1: ...'."""
    return "; ".join(f"{key[0]}x{key[1]}{''.join(f' {t}' for t in key[2:])}: {plan.describe()}"
                     for key, plan in plans.items())


def candidates(packed: bool) -> list[Path]:
    """The paths this build can run: the C kernels where they built, oneDNN's where `packed`, PyTorch's, and
    PyTorch's split by output rows over the threads where there are several."""
    paths: list[Path] = ["torch"]
    if torch.get_num_threads() > 1:
        paths.append("split")
    if native.matmuls_available():
        paths += ["gemv", "gemm"]
    if packed and cpu_gemm.available():
        paths.append("packed")
    return paths


def choose(times: Mapping[Path, Sequence[float]], bounds: Sequence[int] = BUCKETS) -> MatmulPlan:
    """The plan that takes the fastest path in each bucket (`times[path][i]`: seconds at `bounds[i]` tokens)."""
    winners = tuple(min(times, key=lambda p: times[p][i]) for i in range(len(bounds)))
    return MatmulPlan(tuple(bounds), winners)


@lru_cache(maxsize=8)
def _calibrated(hidden: int, rows: int, paths: tuple[Path, ...], threads: int, qtype: str | None) -> MatmulPlan:
    """`calibrate`, once per shape, paths, thread count and GGUF type in a process (tests load many small models),
    on the least times every start on this machine has seen (plan_times)."""
    entry = f"{rows}x{hidden} {qtype or 'f32'} threads={threads} paths={','.join(sorted(paths))}"
    return calibrate(hidden, rows, paths, qtype=qtype,
                     remember=lambda times: plan_times.merged(entry, {str(p): t for p, t in times.items()}))


def calibrate(hidden: int, rows: int, paths: Sequence[Path], bounds: Sequence[int] = BUCKETS,
              qtype: str | None = None,
              remember: Callable[[dict[Path, list[float]]], Mapping[str, list[float]]] | None = None) -> MatmulPlan:
    """Time every path on a random [rows, hidden] weight (rows cut to MAX_ELEMENTS in all) at each bucket's token
    count, on the threads torch has now (the worker's), and keep the fastest per bucket ('quant' is timed on the
    same weight in `qtype`'s blocks; `remember` may replace the timings, e.g. by the least ever seen). Buckets
    whose call would exceed MAX_CALL_FLOP are not timed: they keep the last timed winner if it is PyTorch's or
    oneDNN's GEMM (they only get better with more tokens), else PyTorch's."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(max(1, min(rows, MAX_ELEMENTS // hidden)), hidden, generator=gen)
    packed = cpu_gemm.pack(weight) if "packed" in paths else None
    blocks = quant.quantize(weight, qtype) if qtype is not None and "quant" in paths else None
    paths = [p for p in paths if (p != "packed" or packed is not None) and (p != "split" or not weight.shape[0]
                                                                         % torch.get_num_threads())
             and (p != "quant" or blocks is not None)]
    timed = [t for i, t in enumerate(bounds) if i == 0 or 2 * t * weight.numel() <= MAX_CALL_FLOP]
    times: dict[Path, list[float]] = {p: [] for p in paths}
    for tokens in timed:
        x = torch.randn(tokens, hidden, generator=gen)
        calls = {p: _call(p, x, weight, packed, blocks) for p in paths}
        reps = max(1, int(MIN_CALL_S / max(_once(calls["torch"]), 1e-6)))
        best = {p: float("inf") for p in paths}
        for _ in range(ROUNDS):
            for p, fn in calls.items():
                best[p] = min(best[p], _timed(fn, reps))
        for p in paths:
            times[p].append(best[p])
    if remember is not None:
        remembered = remember(times)
        times = {p: remembered[p] for p in times}
    if blocks is not None and "quant" in times:
        times = read_floors(times, weight.numel() * weight.element_size(), blocks.data.numel())
    last = min(times, key=lambda p: times[p][-1])
    keep = last if last in ("torch", "packed") else "torch"
    for _ in bounds[len(timed):]:
        for p in paths:
            times[p].append(0.0 if p == keep else 1.0)
    return choose(times, bounds)


def read_floors(times: Mapping[Path, list[float]], plain_bytes: int, block_bytes: int) -> dict[Path, list[float]]:
    """Each path's times raised to the least it can take in a step: its weight's bytes over this machine's read
    bandwidth. The timing repeats one weight, which then sits in cache, but a decode step reads every weight of
    the model once, from memory, where GGUF blocks (5/32 of the fp32 bytes for Q4_1) count: on the bundled SmolLM2,
    1-sequence steps took 19-28 ms on blocks, 34-36 ms on cached timings alone. Ties keep the timed order."""
    rate = plan_times.read_bandwidth()
    out: dict[Path, list[float]] = {}
    for path, seconds in times.items():
        floor = (block_bytes if path == "quant" else plain_bytes) / rate
        out[path] = [max(t, floor) + t * 1e-6 for t in seconds]
    return out


def run(path: Path, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        packed: torch.Tensor | None, blocks: QuantWeight | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in].T (+ bias) on `path` (`packed`: oneDNN's copy of weight, for 'packed';
    `blocks`: its GGUF blocks, for 'quant')."""
    if path == "quant":
        assert blocks is not None, "the plan chose the GGUF block path for a weight that has no blocks"
        return quant.matmul(x, blocks, bias)
    if path == "gemv":
        return native.gemv(x, weight, bias)
    if path == "gemm":
        return native.gemm(x, weight, bias)
    if path == "packed":
        assert packed is not None, "the plan chose oneDNN's path for a weight that has no packed copy"
        return cpu_gemm.packed_linear(x, packed, bias)
    if path == "split" and weight.shape[0] % torch.get_num_threads() == 0:
        return split_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in].T (+ bias) as one batched matmul over one block of output rows per torch thread
    (out must divide by the thread count): every core reads weights where PyTorch's GEMM streams few tokens on one."""
    splits, rows, tokens = torch.get_num_threads(), weight.shape[0], x.shape[0]
    blocks = weight.view(splits, rows // splits, weight.shape[1]).transpose(1, 2)  # [S, in, out / S]
    out = torch.bmm(x.expand(splits, tokens, x.shape[1]), blocks)  # [S, T, out / S]
    out = out.transpose(0, 1).reshape(tokens, rows)  # [T, out], rows back in order
    return out if bias is None else out.add_(bias)


def _call(path: Path, x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
          blocks: QuantWeight | None) -> Callable[[], object]:
    return lambda: run(path, x, weight, None, packed, blocks)


def _once(fn: Callable[[], object]) -> float:
    """Seconds of one call, after one warm-up call."""
    fn()
    return _timed(fn, 1)


def _timed(fn: Callable[[], object], reps: int) -> float:
    """Mean seconds per call over `reps` calls."""
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps
