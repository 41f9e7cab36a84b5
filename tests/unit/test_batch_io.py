"""Batch input validation and the resumable result log (no Ray)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.batch_io import ResultLog, parse_line, read_requests


class Words:
    """A stand-in tokenizer: one id per word."""

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]


def lines(*objs: object) -> list[bytes]:
    """JSONL lines as the job reads them (bytes; str items are taken verbatim)."""
    return [o.encode() if isinstance(o, str) else json.dumps(o).encode() for o in objs]


def test_bad_lines_get_records_with_line_numbers_and_the_rest_runs() -> None:
    """Bad JSON, unknown field, empty prompt, non-UTF-8, too long, duplicate id: error records; the rest run."""
    raw = lines({"id": "a", "prompt": "x yy"}, "{oops", {"prompt": "x", "bogus": 1}, {"prompt": ""},
                {"id": "a", "prompt": "zz"}, {"prompt_token_ids": [1] * 60, "max_tokens": 10},
                {"prompt_token_ids": [99]}) + [b"\xff\xfe", b""] + lines({"id": 7, "prompt_token_ids": [3, 4]})
    reqs, records, skipped = read_requests(raw, Words(), vocab_size=50, max_model_len=64, done=set())
    assert [r.request_id for r in reqs] == [0, 9] and reqs[0].prompt_ids == [1, 2] and skipped == 0
    errors = {rec["line"]: rec["error"] for rec in records.values() if "error" in rec}
    assert "not valid JSON" in errors[2]
    assert "bogus" in errors[3]
    assert "prompt" in errors[4]
    assert "repeats line 1" in errors[5]
    assert "max_model_len=64" in errors[6]
    assert "[0, 50)" in errors[7]
    assert "UTF-8" in errors[8]
    assert 9 not in errors  # blank line: ignored


def test_finished_ids_are_skipped_on_rerun() -> None:
    """Keys already done are not requests again; lines without id are keyed by line number."""
    raw = lines({"id": "a", "prompt": "x"}, {"prompt": "y"}, {"id": "c", "prompt": "z"})
    reqs, _, skipped = read_requests(raw, Words(), 50, 64, done={'id:"a"', "line:2"})
    assert [r.request_id for r in reqs] == [2] and skipped == 2


def test_result_log_repairs_torn_line_dedupes_and_orders(tmp_path: Path) -> None:
    """A killed job's half line is cut; a success beats an earlier error; final file in input order."""
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"id": "b", "line": 2, "text": "B"}) + "\n" +
                    json.dumps({"id": None, "line": 3, "error": "grid died"}) + "\n" + '{"id": "a", "li')
    log = ResultLog(path)
    assert log.finished() == {'id:"b"'}
    log.append({"id": None, "line": 3, "text": "C"})
    log.append({"id": "a", "line": 1, "text": "A"})
    final = log.finalize(ordered=True)
    assert [r["line"] for r in final] == [1, 2, 3] and "error" not in final[2]
    assert [json.loads(x)["text"] for x in path.read_text().splitlines()] == ["A", "B", "C"]


def test_parse_line_names_the_field() -> None:
    """Range errors name the field."""
    with pytest.raises(ValueError, match="max_tokens"):
        parse_line(b'{"prompt": "x", "max_tokens": 0}')
    with pytest.raises(ValueError, match="exactly one"):
        parse_line(b'{"prompt": "x", "prompt_token_ids": [1]}')


KEYS = ["id", "prompt", "prompt_token_ids", "max_tokens", "temperature", "stop", "x"]
OBJECTS = st.dictionaries(st.sampled_from(KEYS),
                          st.none() | st.integers(-2**70, 2**70) | st.text(max_size=10)
                          | st.lists(st.integers(-3, 80), max_size=5))
LINES = st.lists(st.binary(max_size=80) | OBJECTS.map(lambda d: json.dumps(d).encode()), max_size=8)


@settings(max_examples=200, deadline=None)
@given(raw=LINES)
def test_any_input_lines_become_requests_or_error_records(raw: list[bytes]) -> None:
    """Random bytes and random objects never raise: each non-blank line is a request or an error record."""
    reqs, records, _ = read_requests(raw, Words(), vocab_size=50, max_model_len=64, done=set())
    ran = {r.request_id for r in reqs}
    for n, line in enumerate(raw):
        if line.strip():
            assert n in records and (n in ran) != ("error" in records[n])


def test_lines_share_the_http_request_model() -> None:
    """A line's sampling fields reach its request; bounds are the HTTP API's; max_tokens defaults to 16."""
    raw = lines({"prompt": "x yy", "temperature": 0.5, "seed": 3, "stop": "zz", "repetition_penalty": 1.2},
                {"prompt": "x", "temperature": 3}, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})
    reqs, records, _ = read_requests(raw, Words(), vocab_size=50, max_model_len=64, done=set())
    p = reqs[0].params
    assert (p.temperature, p.seed, p.stop_list(), p.repetition_penalty, p.max_tokens) == (0.5, 3, ["zz"], 1.2, 16)
    assert p.sampling().seed == 3 and type(p).__name__ == "GenerationParams"
    assert "temperature" in records[1]["error"] and "at most 4" in records[2]["error"]
