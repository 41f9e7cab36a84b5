"""The OpenAI-compatible endpoint, spoken to with the official `openai` client and raw HTTP."""
from __future__ import annotations

import os

import httpx
import openai
import pytest

from tests.reference import hf_greedy

pytestmark = pytest.mark.slow  # a Serve app deployed by the module's fixture (on the package's shared Ray)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    """An OpenAI client pointed at the test server."""
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    """GET /v1/models names the served model and its max_model_len: the model's 256 positions (none configured)."""
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["max_model_len"] == 256


def test_completion_token_ids_equal_hf_greedy(client: openai.OpenAI, chat_model: str) -> None:
    """A token-id prompt through HTTP gives HF's greedy continuation (as text), with usage."""
    from transformers import AutoTokenizer

    prompt = [3, 17, 5, 42, 8]
    ref, _ = hf_greedy(chat_model, prompt, 6)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    tok = AutoTokenizer.from_pretrained(chat_model)
    assert out.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 6
    assert out.choices[0].finish_reason == "length"


def test_min_tokens_holds_back_a_stop_token(client: openai.OpenAI, chat_model: str) -> None:
    """vLLM's min_tokens through the openai client: the greedy first token as a stop token ends the answer at
    once, unless min_tokens asks for more first."""
    prompt = [3, 17, 5, 42, 8]
    ref, _ = hf_greedy(chat_model, prompt, 1)
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    stopped = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "stop_token_ids": ref})
    held = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "stop_token_ids": ref,
                                                           "min_tokens": 4})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens >= 5  # the stop token could come 5th at the earliest, else 6 (length)


def test_streaming_chat_reassembles_to_the_whole_answer(client: openai.OpenAI) -> None:
    """Streamed chat deltas concatenate to the non-streamed answer (same seed)."""
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=12,
                  temperature=0.8, seed=7, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
             if c.choices]
    assert "".join(parts) == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 12


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "other", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": [1, 2, 999999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "bogus": 1}, 400, "bogus"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens"),
])
def test_bad_requests_get_openai_errors(server: str, body: dict, status: int, param: str) -> None:
    """Bad fields answer 4xx with an OpenAI error body naming the field."""
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_invalid_json_is_a_400(server: str) -> None:
    """Malformed JSON is a 400, not a 500; the server keeps serving afterwards."""
    r = httpx.post(f"{server}/v1/completions", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_n_choices_logprobs_and_penalties(client: openai.OpenAI) -> None:
    """n=3 seeded choices differ, each with per-token logprobs; penalties are accepted."""
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=1.0, seed=1, n=3,
                                    logprobs=2, presence_penalty=0.5, frequency_penalty=0.5,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.2})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1
    for c in out.choices:
        assert len(c.logprobs.token_logprobs) == 5 and all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(1 <= len(top) <= 2 for top in c.logprobs.top_logprobs)  # ids decoding alike merge
    assert out.usage.completion_tokens == 15


def test_chat_logprobs_streamed(client: openai.OpenAI) -> None:
    """Streaming chat with logprobs carries one logprob entry per token."""
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, logprobs=True, top_logprobs=1, stream=True,
                                                 extra_body={"ignore_eos": True}))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 4 and all(len(e.top_logprobs) == 1 for e in entries)


def metric_values(server: str) -> dict[str, float]:
    """Sample name -> value of GET /metrics, parsed by prometheus_client (first sample of each name)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server}/metrics").text):
        for sample in family.samples:
            out.setdefault(sample.name, sample.value)
    return out


def test_metrics_endpoint_counts_tokens(server: str, client: openai.OpenAI) -> None:
    """GET /metrics is Prometheus text whose token counters and histograms moved after a request."""
    client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, extra_body={"ignore_eos": True})
    values = metric_values(server)
    assert values["gridserve_generation_tokens_total"] >= 3 and values["gridserve_kv_cache_blocks"] > 0
    assert values["gridserve_request_generation_tokens_count"] >= 1 and "gridserve_num_requests_running" in values


def test_shared_prompt_prefix_is_served_from_the_prefix_cache(server: str, client: openai.OpenAI,
                                                              chat_model: str) -> None:
    """A second prompt with the same 12-token start reuses its KV blocks (metrics say so), answer still HF's."""
    shared = [9, 31, 4, 27, 18, 6, 44, 2, 13, 57, 21, 8]
    client.completions.create(model="tiny", prompt=shared + [3], max_tokens=2, extra_body={"ignore_eos": True})
    before = metric_values(server)["gridserve_prefix_cache_hits_total"]
    prompt = shared + [40, 1]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert metric_values(server)["gridserve_prefix_cache_hits_total"] - before >= 12  # 3 blocks of 4 tokens
    from transformers import AutoTokenizer

    ref, _ = hf_greedy(chat_model, prompt, 5)
    assert out.choices[0].text == AutoTokenizer.from_pretrained(chat_model).decode(ref, skip_special_tokens=True)


def test_embeddings_equal_hf_last_hidden_states(client: openai.OpenAI, server: str, chat_model: str) -> None:
    """`embeddings.create` over tp=2 x pp=2: unit vectors along HF's last-token final hidden states, in input
    order, for texts and token ids, as floats and as base64; usage counts the tokens."""
    import base64

    import numpy as np
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(chat_model)
    texts = ["hello there", "a longer sentence to embed, with a comma"]
    out = client.embeddings.create(model="tiny", input=texts)
    ids = [tok.encode(t) for t in texts]
    assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens == sum(map(len, ids))
    for prompt, item in zip(ids, out.data):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1].numpy()
        np.testing.assert_allclose(item.embedding, ref / np.linalg.norm(ref), rtol=1e-3, atol=1e-4)
    raw = httpx.post(f"{server}/v1/embeddings", json={"model": "tiny", "input": ids[0], "encoding_format": "base64"},
                     timeout=60).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, out.data[0].embedding, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "input": []}, 400, "input"),
    ({"model": "tiny", "input": ["ok", ""]}, 400, "input"),
    ({"model": "tiny", "input": "hi", "dimensions": 8}, 400, "dimensions"),
    ({"model": "tiny", "input": [[1, 2, 999999]]}, 400, "input"),
    ({"model": "tiny", "input": list(range(3, 300))}, 400, "input"),
    ({"model": "other", "input": "hi"}, 404, "model"),
])
def test_bad_embedding_requests_name_the_field(server: str, body: dict, status: int, param: str) -> None:
    """Empty inputs, an unsupported `dimensions`, unknown token ids, an input over the context and an unknown
    model: OpenAI error bodies naming the field; the server keeps serving."""
    r = httpx.post(f"{server}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def thread_nices() -> list[int]:
    """Niceness of every thread of the calling process (run inside a replica actor)."""
    out = []
    for task in os.listdir("/proc/self/task"):
        try:
            out.append(os.getpriority(os.PRIO_PROCESS, int(task)))
        except OSError:
            continue  # a thread that ended meanwhile
    return out


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="moving Ray's niceness 15 back to 0 needs CAP_SYS_NICE (root here)")
def test_request_path_replicas_run_at_serve_nice(server: str, client: openai.OpenAI) -> None:
    """Ray starts actors at niceness 15; the ingress and the model replica move every thread to serve_nice (0), so
    a step holding every core does not keep arriving requests from the engine."""
    import ray

    client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2)  # threads started lazily must inherit it
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::gridserve#")]
    assert {name.split("#")[1] for name in names} == {"OpenAIIngress", "LLMServer"}
    for name in names:
        actor = ray.get_actor(name, namespace="serve")
        nices = ray.get(actor.__ray_call__.remote(lambda _: thread_nices()), timeout=60)
        assert len(nices) > 1 and set(nices) == {0}, (name, nices)
