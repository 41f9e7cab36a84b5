"""Batch job input and output: validated JSONL lines in, an append-only result log out that a rerun resumes."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from cluster.generate import Request
from cluster.request import GenerationParams, Limits, Result, SamplingOptions
from deployments.chat import chat_prompt_ids
from deployments.openai_extras import ChatMessage

BATCH_MAX_TOKENS = 16  # a line's default max_tokens, as for offline generation in vLLM (HTTP fills the context)


class BatchLine(SamplingOptions):
    """One input line (or Ray Data row): the sampling fields HTTP bodies share, plus the line's id and prompt."""

    id: str | int | None = Field(None, description="Caller's id, copied to the output line; a rerun skips "
                                 "ids already finished (default key: the line number).")
    prompt: str | None = Field(None, min_length=1, description="Text prompt (tokenized with the model's tokenizer).")
    prompt_token_ids: list[int] | None = Field(None, min_length=1, description="Prompt as token ids.")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Chat turns, rendered with the "
                                               "model's chat template (with the assistant's generation prompt).")
    max_tokens: int | None = Field(BATCH_MAX_TOKENS, ge=1, description="Most tokens to generate; null fills "
                                   "max_model_len.")
    model: str | None = Field(None, description="A LoRA adapter from lora_modules to generate with; unset or the "
                              "model's own name = the base model.")

    @model_validator(mode="after")
    def _one_prompt(self) -> BatchLine:
        """Exactly one of prompt / prompt_token_ids / messages."""
        if sum(x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)) != 1:
            raise ValueError("give exactly one of `prompt`, `prompt_token_ids` and `messages`")
        return self


def validate_line(obj: Any) -> BatchLine:
    """Validate one decoded line or row; raises ValueError naming each bad field."""
    try:
        return BatchLine.model_validate(obj)
    except ValidationError as exc:
        parts = [f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors()]
        raise ValueError("; ".join(parts)) from None


def parse_line(raw: bytes) -> BatchLine:
    """Parse and validate one JSONL line; raises ValueError with a readable message."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    return validate_line(obj)


def line_request(line: BatchLine, tokenizer: Any, limits: Limits) -> tuple[list[int], GenerationParams]:
    """A valid line's prompt ids and params, checked against a grid's limits (ValueError if it can never run)."""
    if tokenizer is None and (line.prompt is not None or line.messages is not None or line.stop):
        raise ValueError("prompt/messages/stop: the model folder has no tokenizer; send prompt_token_ids (no stop)")
    if line.messages is not None:
        ids = chat_prompt_ids(tokenizer, line.messages)
    else:
        ids = line.prompt_token_ids or tokenizer.encode(line.prompt)
    params = GenerationParams(**line.model_dump(include=set(SamplingOptions.model_fields)), lora=line.model)
    params.check(ids, limits)  # fail the line now, not on a grid
    return ids, params


def record_key(record: dict[str, Any]) -> str:
    """What a rerun matches finished work by: the caller's id, else the 1-based line number."""
    return f"id:{json.dumps(record['id'])}" if record.get("id") is not None else f"line:{record['line']}"


def best_effort_id(raw: bytes) -> Any:
    """The line's `id` if the line is at least a JSON object with a scalar id, else None."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, (str, int)) else None


def read_requests(raw_lines: list[bytes], tokenizer: Any, vocab_size: int, max_model_len: int,
                  done: set[str]) -> tuple[list[Request], dict[int, dict], int]:
    """Validate every line; returns requests to run (id = line index), error records, lines skipped as done."""
    requests: list[Request] = []
    records: dict[int, dict] = {}
    seen: dict[str, int] = {}
    skipped = 0
    for n, raw in enumerate(raw_lines):
        if not raw.strip():
            continue
        record = {"id": best_effort_id(raw), "line": n + 1}
        try:
            line = parse_line(raw)
            record["id"] = line.id
            key = record_key(record)
            if key in seen:
                raise ValueError(f"id {line.id!r} repeats line {seen[key]}; ids must be unique so a rerun can skip "
                                 "finished lines")
            seen[key] = n + 1
            if key in done:
                skipped += 1
                continue
            ids, params = line_request(line, tokenizer, Limits(max_model_len, max_model_len, vocab_size))
            requests.append(Request(n, ids, params))
            records[n] = record
        except ValueError as exc:
            records[n] = {**record, "error": str(exc)}
    return requests, records, skipped


class ResultLog:
    """Append-only JSONL of finished records: written as results land, read back by a rerun, ordered at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repair()
        self.file = open(path, "a", encoding="utf-8")
        self.last_sync = time.monotonic()

    def repair(self) -> None:
        """Cut a torn last line (the job was killed mid-write) so appends start on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def records(self) -> list[dict[str, Any]]:
        """Every intact record in the file, oldest first."""
        out = []
        if self.path.exists():
            for raw in self.path.read_bytes().splitlines():
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(obj, dict) and "line" in obj:
                    out.append(obj)
        return out

    def finished(self) -> set[str]:
        """Keys of records that succeeded (failed ones are redone by a rerun)."""
        return {record_key(r) for r in self.records() if "error" not in r}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record now; flushed at once (a killed job keeps it), fsynced at most once a second."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if time.monotonic() - self.last_sync > 1.0:
            os.fsync(self.file.fileno())
            self.last_sync = time.monotonic()

    def finalize(self, ordered: bool) -> list[dict[str, Any]]:
        """Rewrite the file with one record per key (a success beats an error), in input order if `ordered`."""
        self.file.close()
        best: dict[str, dict[str, Any]] = {}
        for r in self.records():
            key = record_key(r)
            if key not in best or "error" in best[key] or "error" not in r:
                best[key] = r
        final = sorted(best.values(), key=lambda r: r["line"]) if ordered else list(best.values())
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in final), encoding="utf-8")
        os.replace(tmp, self.path)
        return final


@dataclass
class Summary:
    """What a run did, for the final line and for callers."""

    requests: int = 0
    skipped: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    per_grid: list[int] = field(default_factory=list)  # requests finished by each grid

    def line(self) -> str:
        """The final summary line of the job log."""
        rate = self.completion_tokens / max(self.wall_s, 1e-9)
        return (f"gridserve batch: {self.requests} requests ({self.skipped} already done, skipped), {self.failed} "
                f"failed, {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
                f"{self.wall_s:.2f} s, {rate:.1f} tokens/s, per grid {self.per_grid}")


class Progress:
    """A tqdm bar on stderr (requests done, tokens/s, ETA) that also keeps the summary counts."""

    def __init__(self, total: int, summary: Summary) -> None:
        from tqdm import tqdm

        self.summary, self.start = summary, time.perf_counter()
        self.bar = tqdm(total=total, desc="gridserve batch", unit="req", file=sys.stderr, mininterval=1.0)

    def add(self, result: Result, grid: int) -> None:
        """Count one finished request."""
        s = self.summary
        s.failed += result.error is not None
        s.prompt_tokens += len(result.prompt_ids)
        s.completion_tokens += len(result.token_ids)
        s.per_grid[grid] += 1
        self.bar.set_postfix_str(f"{s.completion_tokens / (time.perf_counter() - self.start):.1f} tok/s",
                                 refresh=False)
        self.bar.update(1)
