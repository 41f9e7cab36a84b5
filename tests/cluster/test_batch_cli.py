"""`python -m deployments.batch` end to end in a subprocess (starts and stops its own local Ray)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reference import hf_greedy

pytestmark = pytest.mark.slow  # each test starts the batch job (and its own Ray) in a subprocess


def test_batch_job_writes_one_line_per_input_in_order(model_dirs: dict, tmp_path: Path) -> None:
    """Greedy lines equal HF; a malformed line gets an error record with its line number; exit code 1.

    No --max-model-len: the job takes the model's own context length (256 here), as vLLM does."""
    d = model_dirs["qwen2_bias"]
    lines = [json.dumps({"id": "a", "prompt_token_ids": [3, 17, 5, 42], "max_tokens": 6, "temperature": 0}),
             "{not json",
             json.dumps({"id": 3, "prompt_token_ids": [7, 7, 1], "max_tokens": 4, "temperature": 0}),
             json.dumps({"id": 4, "prompt": "x", "unknown_field": 1})]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-m", "deployments.batch", "--model", str(d), "--tensor-parallel-size",
                           "2", "--pipeline-parallel-size", "2", "--input", str(src),
                           "--output", str(dst)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o.get("id") for o in out] == ["a", None, 3, 4]
    assert out[1]["line"] == 2 and "JSON" in out[1]["error"]
    assert out[3]["line"] == 4 and "unknown_field" in out[3]["error"]
    for o, prompt, n in ((out[0], [3, 17, 5, 42], 6), (out[2], [7, 7, 1], 4)):
        ref, _ = hf_greedy(d, prompt, n)
        assert o["token_ids"] == ref[:len(o["token_ids"])]
        assert o["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(o["token_ids"])}
        assert o["finish_reason"] in ("length", "stop")
    assert "4 requests (0 already done, skipped), 2 failed" in proc.stderr


def test_replicas_auto_spreads_lines_over_every_grid_that_fits(local_ray: None, model_dirs: dict,
                                                               tmp_path: Path) -> None:
    """4 logical GPUs hold two tp=1 pp=2 grids: both take work, every line equals HF, input order kept."""
    from cluster.config import GridServeConfig
    from deployments.batch import run

    d = model_dirs["llama_gqa"]
    prompts = [[3 + i, 17, 5, 42][: 2 + i % 3] for i in range(12)]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": 5, "temperature": 0,
                                       "ignore_eos": True}) + "\n" for p in prompts))
    cfg = GridServeConfig(model=str(d), pipeline_parallel_size=2, max_model_len=64, max_num_seqs=2)
    summary = run(cfg, src, dst, replicas=None)
    assert len(summary.per_grid) == 2 and min(summary.per_grid) > 0 and summary.failed == 0
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["line"] for o in out] == list(range(1, 13))
    for o, p in zip(out, prompts):
        assert o["token_ids"] == hf_greedy(d, p, 5)[0]
