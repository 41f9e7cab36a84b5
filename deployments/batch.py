"""Offline batch generation over one grid: JSONL in, JSONL out (also the `ray job submit` entry point)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.shard.sampler import SamplingParams
from cluster.config import GridServeConfig, args_from_serve_config
from cluster.generate import Request

log = logging.getLogger("gridserve.batch")


class BatchLine(BaseModel):
    """One input line."""

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = Field(None, description="Caller's id, copied to the output line.")
    prompt: str | None = Field(None, min_length=1, description="Text prompt (tokenized with the model's tokenizer).")
    prompt_token_ids: list[int] | None = Field(None, min_length=1, description="Prompt as token ids.")
    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 = off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability.")
    seed: int | None = Field(None, description="Per-request seed: the same seed gives the same tokens.")
    stop: str | list[str] | None = Field(None, description="Stop string(s); the text ends before them.")

    @model_validator(mode="after")
    def _one_prompt(self) -> "BatchLine":
        """Exactly one of prompt / prompt_token_ids."""
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of `prompt` and `prompt_token_ids`")
        return self

    def sampling(self) -> SamplingParams:
        """The sampler's view of this line."""
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.min_p, self.seed)


def parse_line(text: str) -> BatchLine:
    """Parse and validate one JSONL line; raises ValueError with a readable message."""
    try:
        return BatchLine.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except ValidationError as exc:
        parts = [f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors()]
        raise ValueError("; ".join(parts)) from None


def build_config(args: argparse.Namespace) -> GridServeConfig:
    """Config file args first, then explicit command-line flags on top."""
    fields: dict[str, Any] = args_from_serve_config(args.config) if args.config else {}
    fields.pop("host", None), fields.pop("port", None)
    for name in ("model", "tensor_parallel_size", "pipeline_parallel_size", "dtype", "max_model_len"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return GridServeConfig(**fields)


def read_requests(lines: list[str], tokenizer: Any, vocab_size: int) -> tuple[list[Request], dict[int, dict]]:
    """Parse every line: valid ones become requests (id = line index), bad ones error records."""
    requests, records = [], {}
    for n, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            line = parse_line(text)
            ids = line.prompt_token_ids or tokenizer.encode(line.prompt)
            if max(ids) >= vocab_size or min(ids) < 0:
                raise ValueError(f"prompt_token_ids must lie in [0, {vocab_size})")
            stop = [line.stop] if isinstance(line.stop, str) else (line.stop or [])
            requests.append(Request(n, ids, line.sampling(), line.max_tokens, stop))
            records[n] = {"id": line.id}
        except ValueError as exc:
            records[n] = {"id": _best_effort_id(text), "line": n + 1, "error": str(exc)}
            log.warning("line %d: %s", n + 1, exc)
    return requests, records


def run(cfg: GridServeConfig, input_path: Path, output_path: Path, address: str | None) -> int:
    """Generate for every line of `input_path`; returns the number of failed lines."""
    from transformers import AutoTokenizer

    from cluster.engine import AsyncEngine
    from cluster.generate import Result, generate_all
    from cluster.grid import WorkerGrid
    from cluster.runtime import connect

    spec = cfg.spec()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    requests, records = read_requests(input_path.read_text().splitlines(), tokenizer, spec.vocab_size)
    started = connect(cfg, address)
    grid = WorkerGrid(cfg)

    def record(res: Result) -> None:
        rec = records[res.request_id]
        if res.error is not None:
            rec.update(line=res.request_id + 1, error=res.error)
            return
        rec.update(text=res.text, token_ids=res.token_ids, finish_reason=res.finish_reason,
                   usage={"prompt_tokens": len(res.prompt_ids), "completion_tokens": len(res.token_ids)})

    async def main() -> None:
        engine = AsyncEngine(grid, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                             cfg.max_model_len, spec.eos_token_ids)
        try:
            await generate_all(engine, requests, tokenizer, record)
        finally:
            grid.close_dag()

    start = time.perf_counter()
    try:
        asyncio.run(main())
    finally:
        grid.shutdown()
        if started:
            import ray
            ray.shutdown()
    elapsed = time.perf_counter() - start
    done = [records[n] for n in sorted(records)]
    output_path.write_text("".join(json.dumps(r) + "\n" for r in done))
    failed = sum("error" in r for r in done)
    completion = sum(r.get("usage", {}).get("completion_tokens", 0) for r in done)
    print(f"gridserve batch: {len(done)} requests, {failed} failed, {completion} completion tokens, "
          f"{elapsed:.2f} s, {completion / max(elapsed, 1e-9):.1f} tokens/s", file=sys.stderr)
    return failed


def _best_effort_id(text: str) -> Any:
    """The line's `id` if the line is at least a JSON object, else None."""
    try:
        obj = json.loads(text)
        return obj.get("id") if isinstance(obj, dict) else None
    except json.JSONDecodeError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; exit code 1 if any line failed."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", help="Ray Serve config file whose first application's args configure the grid")
    ap.add_argument("--model", help="local Hugging Face model folder")
    ap.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int)
    ap.add_argument("--pipeline-parallel-size", dest="pipeline_parallel_size", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--max-model-len", dest="max_model_len", type=int)
    ap.add_argument("--input", required=True, type=Path, help="JSONL file of requests")
    ap.add_argument("--output", required=True, type=Path, help="JSONL file to write, one line per input line")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = build_config(args)
        if not args.input.is_file():
            raise ValueError(f"--input {args.input} is not a readable file")
    except (ValueError, ValidationError) as exc:
        print(f"gridserve batch: {exc}", file=sys.stderr)
        return 2
    return 1 if run(cfg, args.input, args.output, args.address) else 0


if __name__ == "__main__":
    sys.exit(main())
