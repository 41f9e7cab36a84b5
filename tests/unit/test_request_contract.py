"""The contract between the ingress and a replica: one GenerationParams in, typed ChoiceDeltas out, and which
failures are the client's (4xx), a lost replica's (503) or ours (500)."""
from __future__ import annotations

import asyncio
import json

import pytest

from cluster.generate import collect
from cluster.request import ChoiceDelta, GenerationParams, Limits, RequestError, TokenLogprob
from cluster.structured import GrammarSpec
from deployments.openai_schema import ChatRequest, CompletionRequest
from deployments.remote_stream import ChunkStream, Refusal, replica_lost


def test_http_bodies_become_one_generation_params() -> None:
    """n, logprobs (either API's spelling) and the output constraint travel in GenerationParams; nothing else."""
    chat = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3,
                                       "logprobs": True, "top_logprobs": 2, "temperature": 0.5, "stop": "##",
                                       "response_format": {"type": "json_object"}, "max_completion_tokens": 7})
    p = chat.params()
    assert (p.n, p.logprobs, p.temperature, p.stop, p.max_tokens) == (3, 2, 0.5, "##", 7)
    assert p.grammar == GrammarSpec("json_object", "") and p.sampling(1).logprobs == 2
    text = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 4, "seed": 10}).params()
    assert text.logprobs == 4 and text.grammar is None and text.sampling(2).seed == 12
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x"}).params().logprobs is None


@pytest.mark.parametrize("prompt,fields,param,text", [
    ([5, 200], {}, "prompt", "[0, 100)"), ([5, 6], {"logit_bias": {"100": 1.0}}, "logit_bias", "[0, 100)"),
    ([], {}, "prompt", "empty"), ([1] * 60, {"max_tokens": 5}, "max_tokens", "at most 4")])
def test_the_replica_side_check_names_the_field(prompt: list[int], fields: dict, param: str, text: str) -> None:
    """Vocabulary, bias ids, empty and too-long prompts: one RequestError naming the field to change."""
    with pytest.raises(RequestError) as err:
        GenerationParams(**fields).check(prompt, Limits(max_model_len=64, kv_tokens=1024, vocab_size=100))
    assert err.value.param == param and text in str(err.value)


def test_budget_is_bounded_by_the_kv_cache_too() -> None:
    """A request is never queued for more tokens than the whole KV cache holds (it would wait forever)."""
    assert GenerationParams().check([1, 2], Limits(max_model_len=512, kv_tokens=64)) == 62


def test_chunks_collect_into_whole_choices_and_a_lost_replica_ends_open_ones() -> None:
    """Deltas of interleaved choices add up per index; the stream dying mid-way ends what was still open."""
    from ray.exceptions import ActorDiedError

    async def replica() -> object:
        yield []
        yield [ChoiceDelta(0, "he", [1], cached_tokens=3), ChoiceDelta(1, "x", [9])]
        yield [ChoiceDelta(0, "llo", [2, 3], "stop", [TokenLogprob("llo", -0.5, [("llo", -0.5)])])]
        raise ActorDiedError()

    async def main() -> list:
        return await collect(await ChunkStream(replica(), GenerationParams(n=2)).start(), 2)

    first, second = asyncio.run(main())
    assert (first.text, first.token_ids, first.finish_reason, first.cached_tokens) == ("hello", [1, 2, 3], "stop", 3)
    assert first.logprobs[0].token == "llo"
    assert second.finish_reason == "error" and "ActorDiedError" in (second.error or "")


def test_refusals_and_failures_map_to_the_right_status() -> None:
    """A refusal is raised at start (400 stays 400, 503 keeps Retry-After); a lost replica is retryable, an
    error raised by code (a bug) is not."""
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    async def refused() -> object:
        yield Refusal(400, "bad max_tokens", "max_tokens")

    with pytest.raises(RequestError) as err:
        asyncio.run(ChunkStream(refused(), GenerationParams()).start())
    assert err.value.param == "max_tokens" and err.value.status == 400
    assert Refusal.of(RequestError("x", "prompt")).exception().param == "prompt"
    assert replica_lost(ActorDiedError()) and replica_lost(BackPressureError(num_queued_requests=1,
                                                                             max_queued_requests=1))
    assert not replica_lost(ValueError("bug")) and not replica_lost(RayTaskError("f", "tb", ValueError("bug")))


def test_a_bug_is_a_500_with_its_traceback_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The ingress's catch-all answers 500 (not a retryable 503) and logs the traceback."""
    from starlette.requests import Request

    from deployments.http import _bug

    request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
                       "query_string": b"", "server": ("127.0.0.1", 80), "scheme": "http", "root_path": ""})
    try:
        raise KeyError("oops")
    except KeyError as exc:
        response = asyncio.run(_bug(request, exc))
    assert response.status_code == 500 and json.loads(response.body)["error"]["type"] == "server_error"
    assert "KeyError" in caplog.text and "Traceback" in caplog.text


def test_metrics_of_several_replicas_merge_into_one_exposition() -> None:
    """Each family appears once with every replica's samples (what /metrics answers behind many replicas)."""
    from prometheus_client.parser import text_string_to_metric_families

    from cluster.metrics import ENGINE_METRICS, ReplicaMetrics
    from deployments.metrics_board import merge

    def replica(name: str, ttft: float) -> bytes:
        status = {"replica": name, "engine": dict.fromkeys(ENGINE_METRICS, 0), "workers": [], "tp": 1, "pp": 1,
                  "rebuilds": 0, "dead": None, "flags": []}
        metrics = ReplicaMetrics(name, "m", lambda: status)
        metrics.requests.ttft.observe(ttft)
        return metrics.text()

    families = list(text_string_to_metric_families(merge([replica("r0", 0.1), replica("r1", 0.2)]).decode()))
    names = [f.name for f in families]
    ttft = next(f for f in families if f.name == "gridserve_time_to_first_token_seconds")
    sums = {s.labels["replica"]: s.value for s in ttft.samples if s.name.endswith("_sum")}
    assert len(names) == len(set(names)) and sums == {"r0": 0.1, "r1": 0.2}


def test_a_lost_replica_choices_continue_on_another_one() -> None:
    """Lost mid-way with `reopen`: each open choice is asked of another replica as n=1 with its seed offset and
    the tokens and text it had sent; a second loss resumes after what the first resumed stream sent; finished
    choices are not asked again; the client's choices come out whole and error-free."""
    from ray.exceptions import ActorDiedError

    asked: list[GenerationParams] = []

    async def first() -> object:
        yield []
        yield [ChoiceDelta(0, "he", [1], cached_tokens=3), ChoiceDelta(1, "x", [9]), ChoiceDelta(2, "z", [7], "stop")]
        raise ActorDiedError()

    async def resumed(p: GenerationParams) -> object:
        yield []
        if p.seed == 10 and p.resume is not None and p.resume.token_ids == [1]:
            yield [ChoiceDelta(0, "l", [2], cached_tokens=0)]
            raise ActorDiedError()  # lost again
        done = p.resume.token_ids if p.resume is not None else []
        ids, text = {10: ([3], "lo"), 11: ([8], "y")}[p.seed or 0]
        assert done == {10: [1, 2], 11: [9]}[p.seed or 0]
        yield [ChoiceDelta(0, text, ids, "length")]

    def reopen(p: GenerationParams) -> object:
        asked.append(p)
        return resumed(p)

    params = GenerationParams(n=3, seed=10, temperature=0.8)

    async def main() -> list:
        return await collect(await ChunkStream(first(), params, reopen, migrate_s=5).start(), 3)

    a, b, c = asyncio.run(main())
    assert (a.text, a.token_ids, a.finish_reason, a.error, a.cached_tokens) == ("hello", [1, 2, 3], "length", None, 3)
    assert (b.text, b.token_ids, b.finish_reason, b.error) == ("xy", [9, 8], "length", None)
    assert (c.text, c.finish_reason) == ("z", "stop")
    assert all(p.n == 1 for p in asked) and sorted(p.seed or 0 for p in asked) == [10, 10, 11]
    again = next(p for p in asked if p.resume is not None and p.resume.token_ids == [1, 2])
    assert again.resume is not None and again.resume.text_chars == 3


def test_a_choice_no_replica_can_take_ends_with_the_error() -> None:
    """Resuming refused for good (a 400), or no reopen at all: the open choice ends with the error, not a hang."""
    from ray.exceptions import ActorDiedError

    async def first() -> object:
        yield []
        yield [ChoiceDelta(0, "he", [1])]
        raise ActorDiedError()

    async def refused(p: GenerationParams) -> object:
        yield Refusal(400, "no")

    async def main() -> list:
        return await collect(await ChunkStream(first(), GenerationParams(), refused, migrate_s=5).start())

    (choice,) = asyncio.run(main())
    assert choice.finish_reason == "error" and choice.text == "he"
