"""Property test over the HTTP API: any body gets a correct completion or a helpful 4xx, and the server stays up."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 6),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "stream", "logprobs", "presence_penalty", "min_p", "ignore_eos", "bogus", "response_format", "guided_json",
          "guided_regex", "guided_choice", "tools", "tool_choice", "logit_bias", "stream_options"]
VALUES = {"model": st.sampled_from(["tiny", "other", ""]) | JSON,
          "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 300), max_size=6) | JSON,
          "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot"]),
                                                      "content": st.text(max_size=20)}), max_size=3) | JSON,
          "max_tokens": st.integers(-2, 6) | st.integers(10**6, 10**20) | JSON,
          "n": st.integers(-1, 3) | JSON, "stream": st.booleans() | JSON,
          "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]) | st.fixed_dictionaries(
              {"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries({"name": st.just("s"),
                                                                                     "schema": JSON})}) | JSON,
          "guided_regex": st.text(max_size=12) | JSON,
          "guided_choice": st.lists(st.text(max_size=6), max_size=3) | JSON,
          "tool_choice": st.sampled_from(["none", "auto", "required"]) | JSON,
          "logit_bias": st.dictionaries(st.integers(-3, 600).map(str), st.floats(-150, 150), max_size=2) | JSON}
BODY = st.fixed_dictionaries({}, optional={k: VALUES.get(k, JSON) for k in FIELDS})
OK = {200, 400, 404, 413, 422}


def check(r: httpx.Response) -> None:
    """A completion, or a 4xx whose OpenAI-style body says what is wrong."""
    assert r.status_code in OK, (r.status_code, r.text[:500])
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text, r.text[-300:]
    else:
        assert r.json()["choices"], r.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_random_bodies_never_break_the_server(server: str, route: str) -> None:
    """Random JSON (huge numbers, negatives, unicode, wrong types, unknown keys) and raw bytes."""
    with httpx.Client(base_url=server, timeout=120) as http:
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(body=BODY)
        def one(body: dict) -> None:
            if "max_tokens" not in body:
                body["max_tokens"] = 4  # keep valid requests short; the range cases come from the strategy
            check(http.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"}))

        @settings(max_examples=15, deadline=None, derandomize=True)
        @given(raw=st.binary(max_size=64))
        def raw_bytes(raw: bytes) -> None:
            check(http.post(route, content=raw, headers={"content-type": "application/json"}))

        one()
        raw_bytes()
        check(http.post(route, content=b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}'))  # oversize body: 413
        assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
