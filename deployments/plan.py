"""`gridserve plan`: print the valid (tp, pp) layouts of a model on a cluster and the one to use."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actors.shard.checkpoint import model_spec
from actors.shard.spec import ModelSpec
from cluster.planner import GIB, ClusterShape, Target, format_plan, plan


def load_spec(path: str) -> ModelSpec:
    """A model folder, a .gguf file or a bare `config.json`."""
    p = Path(path)
    if p.is_file() and p.suffix != ".gguf":
        return ModelSpec.from_hf_dict(json.loads(p.read_text()))
    return model_spec(p)


def shape_from_ray(address: str | None, gpu_memory_gib: float, interconnect: str) -> ClusterShape:
    """Nodes and GPUs per node of a running Ray cluster (the smallest GPU node bounds a TP group)."""
    import ray

    ray.init(address=address or "auto", log_to_driver=False)
    try:
        gpus = [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
    gpus = [g for g in gpus if g > 0]
    if not gpus:
        raise ValueError("--from-ray: the cluster has no GPU nodes; give --nodes and --gpus-per-node instead")
    return ClusterShape(len(gpus), min(gpus), int(gpu_memory_gib * GIB), interconnect)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog="gridserve plan", description=__doc__)
    ap.add_argument("model", help="local Hugging Face model folder, its config.json, or a .gguf file")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--interconnect", choices=["nvlink", "pcie"], default="nvlink")
    ap.add_argument("--from-ray", action="store_true", help="read nodes and GPUs from the running Ray cluster")
    ap.add_argument("--address", help="Ray cluster for --from-ray (default: RAY_ADDRESS or the local one)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=32, help="concurrent sequences the KV cache must hold")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--memory-utilization", type=float, default=0.9)
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.model)
        if args.from_ray:
            shape = shape_from_ray(args.address, args.gpu_memory_gib, args.interconnect)
        else:
            if min(args.nodes, args.gpus_per_node) < 1 or args.gpu_memory_gib <= 0:
                raise ValueError("--nodes and --gpus-per-node must be >= 1 and --gpu-memory-gib > 0")
            shape = ClusterShape(args.nodes, args.gpus_per_node, int(args.gpu_memory_gib * GIB), args.interconnect)
        target = Target(args.max_model_len, args.max_num_seqs, args.dtype, args.memory_utilization)
        print(format_plan(spec, shape, target, plan(spec, shape, target)))
    except ValueError as exc:
        print(f"gridserve plan: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
