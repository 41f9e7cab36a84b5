"""The batch job's command line: flags, and the config they build (on top of a Serve config file's args)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cluster.config import DEFAULT_MODEL, GridServeConfig, args_from_serve_config


def parse_args(argv: list[str] | None, description: str | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="Ray Serve config file whose first application's args configure the grid")
    ap.add_argument("--model", help="local Hugging Face model folder")
    ap.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int)
    ap.add_argument("--pipeline-parallel-size", dest="pipeline_parallel_size", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--max-model-len", dest="max_model_len", type=int)
    ap.add_argument("--max-num-seqs", dest="max_num_seqs", type=int)
    ap.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, help="CPU clusters: cores per worker")
    ap.add_argument("--replicas", default="1", help="grids side by side (data parallel): a number or 'auto' "
                    "(as many as the cluster fits)")
    ap.add_argument("--input", required=True, type=Path, help="JSONL file of requests")
    ap.add_argument("--output", required=True, type=Path, help="JSONL results; rerunning with the same file "
                    "skips the lines already finished")
    ap.add_argument("--ordered", action=argparse.BooleanOptionalAction, default=True,
                    help="final file in input order (default) or in completion order")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace) -> GridServeConfig:
    """Config file args first, then explicit command-line flags on top; the paths and --replicas checked."""
    fields: dict[str, Any] = args_from_serve_config(args.config) if args.config else {}
    for name in ("model", "tensor_parallel_size", "pipeline_parallel_size", "dtype", "max_model_len",
                 "max_num_seqs", "cpus_per_worker"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if "model" not in fields or fields["model"] == DEFAULT_MODEL:
        from deployments.make_model import ensure_default_model
        fields = ensure_default_model(fields)  # the bundled demo model, written on first use
    cfg = GridServeConfig.from_args(fields)
    if args.replicas != "auto" and (not args.replicas.isdigit() or int(args.replicas) < 1):
        raise ValueError(f"--replicas {args.replicas!r}: expected a positive number or 'auto'")
    if not args.input.is_file():
        raise ValueError(f"--input {args.input}: not a readable file")
    if not args.output.parent.is_dir():
        raise ValueError(f"--output {args.output}: folder {args.output.parent} does not exist")
    return cfg
