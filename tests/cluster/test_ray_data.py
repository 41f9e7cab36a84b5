"""Batch on Ray Data: Parquet rows through `deployments.ray_data.build_processor` over tp=2 grids, against HF."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.reference import hf_greedy

pytestmark = pytest.mark.slow  # starts grids inside a Ray Data actor pool

ROWS = 200
PARTS = 4
BAD = {17: "max_model_len", 58: "temperature", 101: "role"}  # row -> a word its error must name
WORDS = ["the", "grid", "serves", "rows", "of", "text", "quickly", "and", "well", "data"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama whose vocabulary is its tokenizer's, so any text prompt is in range."""
    from deployments.make_model import write_model

    return write_model(tmp_path_factory.mktemp("rd") / "tiny", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, seed=5,
                       max_position_embeddings=256)


def make_rows(vocab: int) -> list[dict[str, Any]]:
    """Token-id, text and chat rows with per-row max_tokens, plus the rows in BAD (every key in every row)."""
    rng = random.Random(7)
    rows = []
    for i in range(ROWS):
        text = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
        row: dict[str, Any] = {"key": f"r{i}", "prompt": None, "prompt_token_ids": None, "messages": None,
                               "max_tokens": rng.randint(2, 5), "temperature": None}
        if i % 3 == 0:
            row["prompt_token_ids"] = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))]
        elif i % 3 == 1:
            row["prompt"] = text
        else:
            row["messages"] = [{"role": "user", "content": text}]
        rows.append(row)
    rows[17].update(prompt=None, messages=None, prompt_token_ids=[5] * 70)  # longer than max_model_len=64
    rows[58]["temperature"] = 5.0
    rows[101].update(prompt=None, prompt_token_ids=None, messages=[{"role": "robot", "content": "hi"}])
    return rows


def reference_ids(tok: Any, row: dict[str, Any]) -> list[int]:
    """The prompt ids HF's own tokenizer gives the row."""
    if row["prompt_token_ids"] is not None:
        return list(row["prompt_token_ids"])
    if row["prompt"] is not None:
        return list(tok.encode(row["prompt"]))
    return list(tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True,
                                        return_dict=False))


def test_parquet_rows_round_trip_hf_identical_over_two_tp2_grids(local_ray: None, text_model: Path,
                                                                  tmp_path: Path) -> None:
    """Every good row's greedy tokens equal HF's; the bad rows carry an error naming the problem; the job
    finishes and the input columns survive the round trip."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch
    import transformers

    from deployments.ray_data import build_processor

    tok = transformers.AutoTokenizer.from_pretrained(text_model)
    rows = make_rows(len(tok))
    src = tmp_path / "in"
    src.mkdir()
    for part in range(PARTS):  # a folder of files, as Ray Data data sets come: a block each, spread over the pool
        pq.write_table(pa.Table.from_pylist(rows[part::PARTS]), src / f"part-{part}.parquet")
    process = build_processor({"model": str(text_model), "tensor_parallel_size": 2, "max_model_len": 64,
                               "max_num_seqs": 16, "block_size": 4, "kv_cache_memory_bytes": 2**20,
                               "replica_cpus": 0.5}, grids=2, sampling={"temperature": 0, "ignore_eos": True})
    start = time.perf_counter()
    process(ray.data.read_parquet(str(src), override_num_blocks=PARTS)).write_parquet(str(tmp_path / "out"))
    wall = time.perf_counter() - start
    print(f"ray data: {ROWS} rows over 2 tp=2 grids in {wall:.1f} s (grid start included)")
    out = {o["key"]: o for o in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(out) == sorted(r["key"] for r in rows), f"rows lost or repeated ({wall:.1f} s)"

    hf = transformers.AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32)
    for i, row in enumerate(rows):
        o = out[row["key"]]
        if i in BAD:
            assert o["error"] is not None and BAD[i] in o["error"], o
            assert o["generated_text"] is None and o["generated_token_ids"] is None
            continue
        assert o["error"] is None, o
        ids = reference_ids(tok, row)
        ref, _ = hf_greedy(text_model, ids, row["max_tokens"], hf=hf)
        assert o["generated_token_ids"] == ref, (i, o)
        assert o["generated_text"] == tok.decode(ref, skip_special_tokens=True).rstrip("\ufffd")  # as vLLM
        assert (o["num_input_tokens"], o["num_generated_tokens"]) == (len(ids), len(ref))
        assert o["finish_reason"] == "length"
        assert o["messages"] == row["messages"]  # input columns pass through


def test_bad_processor_settings_fail_before_any_row(text_model: Path) -> None:
    """An unknown sampling field, a bad default or a zero pool size is refused when the processor is built."""
    from deployments.ray_data import build_processor

    cfg = {"model": str(text_model), "max_model_len": 64}
    with pytest.raises(ValueError, match="temprature"):
        build_processor(cfg, sampling={"temprature": 0})
    with pytest.raises(ValueError, match="top_p"):
        build_processor(cfg, sampling={"top_p": 0})
    with pytest.raises(ValueError, match="grids=0"):
        build_processor(cfg, grids=0)
