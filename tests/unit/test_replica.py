"""The Replica over in-process grids: generation, the one failure policy (fail, rebuild, report), request checks."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cluster.generate import collect
from cluster.replica import RETRY_AFTER_OVERLOAD_S, RETRY_AFTER_REBUILD_S, Replica, ReplicaUnavailable
from cluster.request import GenerationParams, RequestError
from tests.local_grid import DyingGrid, LocalGrid, config, grids
from tests.reference import PROMPTS, greedy, hf_greedy


def test_generate_matches_hf_and_snapshot_reports_the_grid(model_dirs: dict) -> None:
    """Greedy choices through the replica equal HF's; the snapshot lists every worker with its memory."""
    d = model_dirs["llama_gqa"]
    replica = Replica(config(d, tensor_parallel_size=2, pipeline_parallel_size=2), "r0",
                      grid_factory=lambda: LocalGrid(str(d), 2, 2))

    async def main() -> tuple[list[list[int]], dict]:
        choices = await asyncio.gather(*(collect(replica.generate(p, greedy(6))) for p in PROMPTS))
        return [c[0].token_ids for c in choices], await replica.snapshot()

    tokens, snap = asyncio.run(main())
    assert tokens == [hf_greedy(d, p, 6)[0] for p in PROMPTS]
    assert sorted((w["pp_rank"], w["tp_rank"]) for w in snap["workers"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(w["weight_bytes"] > 0 and w["steps"] > 0 for w in snap["workers"])
    assert snap["engine"]["generation_tokens_total"] == 18 and snap["replica"] == "r0" and snap["dead"] is None


class SlowStatsGrid(LocalGrid):
    """A grid whose workers are alive but too busy to answer the stats probe in time."""

    def worker_stats(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Time out like ray.get does (Ray's GetTimeoutError is a TimeoutError)."""
        raise TimeoutError("stats probe timed out")


def test_a_slow_stats_probe_does_not_fail_the_replica(model_dirs: dict) -> None:
    """Busy is not dead: a probe timeout keeps the last worker figures, refreshes the engine's, fails nothing."""
    d = str(model_dirs["llama_gqa"])
    replica = Replica(config(d), grid_factory=lambda: SlowStatsGrid(d, 1, 1))

    async def main() -> tuple[dict, list[int]]:
        choice = (await collect(replica.generate(PROMPTS[0], greedy(3))))[0]
        return await replica.snapshot(), choice.token_ids

    snap, tokens = asyncio.run(main())
    assert snap["dead"] is None and snap["workers"] == [] and snap["engine"]["generation_tokens_total"] == 3
    assert tokens == hf_greedy(d, PROMPTS[0], 3)[0] and replica.rebuilds == 0


def test_failed_grid_fails_in_flight_work_then_heals_in_place(model_dirs: dict) -> None:
    """Without migration a dying grid ends the running request with an error, new requests get 503-style
    ReplicaUnavailable with the rebuild Retry-After, and after the rebuild the replica serves again (rebuilds
    counted)."""
    d = str(model_dirs["llama_gqa"])
    replica = Replica(config(d, migration_timeout_s=0),
                      grid_factory=grids(lambda: DyingGrid(d, 3), lambda: LocalGrid(d, 1, 1)))

    async def main() -> tuple[Any, ReplicaUnavailable, bool, list[int]]:
        failed = (await collect(replica.generate(PROMPTS[0], greedy(10))))[0]
        with pytest.raises(ReplicaUnavailable) as refused:
            replica.generate(PROMPTS[0], greedy(2))
        ready = await replica.ready()
        after = (await collect(replica.generate(PROMPTS[1], greedy(4))))[0]
        return (failed.finish_reason, failed.error), refused.value, ready, after.token_ids

    (reason, error), refused, ready, tokens = asyncio.run(main())
    assert reason == "error" and "worker died" in error
    assert refused.retry_after_s == RETRY_AFTER_REBUILD_S and "being rebuilt" in str(refused)
    assert ready and replica.rebuilds == 1 and replica.failure() is None
    assert tokens == hf_greedy(d, PROMPTS[1], 4)[0]


def test_a_failed_rebuild_is_reported(model_dirs: dict) -> None:
    """If the new grid cannot start, the request that waited to migrate fails and `failure()` says why (Serve's
    health check then replaces the replica)."""
    d = str(model_dirs["llama_gqa"])

    def no_resources() -> Any:
        raise TimeoutError("the grid's placement group was not ready")

    replica = Replica(config(d), grid_factory=grids(lambda: DyingGrid(d, 1), no_resources))

    async def main() -> tuple[str | None, bool]:
        choice = (await collect(replica.generate(PROMPTS[0], greedy(3))))[0]  # waits on the rebuild, which fails
        return choice.finish_reason, await replica.ready()

    assert asyncio.run(main()) == ("error", False)
    assert "grid rebuild failed" in replica.failure() and "placement group" in replica.failure()


@pytest.mark.parametrize("prompt,max_tokens,param,text", [
    ([], 4, "prompt", "empty"), (list(range(1, 50)) * 6, None, "prompt", "max_model_len is 256"),
    ([5, 6], 255, "max_tokens", "at most 254"), ([5, 96], 4, "prompt", "[0, 96)")])
def test_requests_that_can_never_fit_are_refused_naming_the_field(model_dirs: dict, prompt: list[int],
                                                                  max_tokens: int | None, param: str,
                                                                  text: str) -> None:
    """Empty, too long, too many tokens asked, out of the vocabulary: RequestError with the field to change."""
    d = str(model_dirs["llama_gqa"])
    replica = Replica(config(d), grid_factory=lambda: LocalGrid(d, 1, 1))
    with pytest.raises(RequestError) as err:
        replica.generate(prompt, GenerationParams(max_tokens=max_tokens))
    assert err.value.param == param and text in str(err.value)


def test_full_queue_is_refused_with_the_overload_retry_after(model_dirs: dict) -> None:
    """Beyond max_waiting_requests queued, a request is refused for now (not failed for good)."""
    d = str(model_dirs["llama_gqa"])
    replica = Replica(config(d, max_num_seqs=1, max_waiting_requests=2), grid_factory=lambda: LocalGrid(d, 1, 1))

    async def main() -> ReplicaUnavailable:
        streams = [replica.generate(PROMPTS[0], greedy(2)) for _ in range(2)]  # none admitted yet: 2 waiting
        with pytest.raises(ReplicaUnavailable) as refused:
            replica.generate(PROMPTS[0], greedy(2))
        await asyncio.gather(*(collect(s) for s in streams))
        return refused.value

    assert asyncio.run(main()).retry_after_s == RETRY_AFTER_OVERLOAD_S


def test_a_stop_string_finishes_the_request_and_is_counted_as_stop(model_dirs: dict) -> None:
    """Ending on a stop string is a normal finish: reason 'stop', blocks freed, counted by the metrics as 'stop'
    with its end-to-end latency (not as an abort)."""
    from prometheus_client.parser import text_string_to_metric_families

    d = str(model_dirs["llama_gqa"])
    replica = Replica(config(d), "r0", grid_factory=lambda: LocalGrid(d, 1, 1))

    async def main() -> tuple[str, str, str, str | None]:
        full = (await collect(replica.generate(PROMPTS[0], greedy(12))))[0].text
        stop = full.strip()[len(full.strip()) // 2:][:2]
        cut = (await collect(replica.generate(PROMPTS[0], greedy(12).model_copy(update={"stop": stop}))))[0]
        text, reason = cut.text, cut.finish_reason
        await collect(replica.generate(PROMPTS[1], greedy(2)))  # the stopped sequence's last step has landed
        return full, stop, text, reason

    full, stop, text, reason = asyncio.run(main())
    assert stop and reason == "stop" and text == full[:full.find(stop)]
    blocks = replica.engine.scheduler.blocks
    assert blocks.num_available == replica.grid.num_blocks and not any(blocks.refs)
    families = {f.name: f for f in text_string_to_metric_families(replica.metrics.text().decode())}
    ended = {s.labels["finished_reason"]: s.value for s in families["gridserve_request_success"].samples
             if s.name.endswith("_total")}
    e2e = next(s.value for s in families["gridserve_e2e_request_latency_seconds"].samples if s.name.endswith("_count"))
    assert ended == {"length": 2.0, "stop": 1.0} and e2e == 3


def test_requests_in_flight_migrate_to_the_rebuilt_grid(model_dirs: dict) -> None:
    """The grid dies mid-generation: greedy and seeded sampled choices (n=2), a stop string and a penalty all
    continue on the rebuilt grid from the tokens they had, exactly as an undisturbed replica generates them."""
    d = str(model_dirs["llama_gqa"])
    sampled = GenerationParams(temperature=0.9, seed=11, n=2, max_tokens=12, ignore_eos=True, presence_penalty=0.5)

    def run(replica: Replica) -> list[list[tuple[list[int], str, str | None, str | None]]]:
        async def main() -> list:
            jobs = [collect(replica.generate(PROMPTS[0], greedy(10))),
                    collect(replica.generate(PROMPTS[1], sampled), 2)]
            outs = await asyncio.gather(*jobs)
            return [[(c.token_ids, c.text, c.finish_reason, c.error) for c in out] for out in outs]
        return asyncio.run(main())

    calm = run(Replica(config(d), grid_factory=lambda: LocalGrid(d, 1, 1)))
    dying = Replica(config(d), grid_factory=grids(lambda: DyingGrid(d, 4), lambda: LocalGrid(d, 1, 1)))
    moved = run(dying)
    assert dying.rebuilds == 1 and moved == calm
    assert calm[0][0][0] == hf_greedy(d, PROMPTS[0], 10)[0] and all(c[3] is None for out in moved for c in out)


def test_a_choice_resumes_from_another_replicas_tokens(model_dirs: dict) -> None:
    """What the ingress sends when a replica is lost mid-stream: choice 1 of a seeded n=2 request, as n=1 with
    its seed offset and the tokens (and text) it had, continues exactly as the undisturbed choice 1."""
    from cluster.request import Resume

    d = str(model_dirs["llama_gqa"])
    replica = Replica(config(d), grid_factory=lambda: LocalGrid(d, 1, 1))
    sampled = GenerationParams(temperature=0.9, seed=11, n=2, max_tokens=12, ignore_eos=True, presence_penalty=0.5)

    async def main() -> tuple[Any, Any]:
        calm = (await collect(replica.generate(PROMPTS[1], sampled), 2))[1]
        done = calm.token_ids[:5]
        resume = Resume(token_ids=done, text_chars=len(replica.tokenizer.decode(done, skip_special_tokens=True)))
        moved = sampled.model_copy(update={"n": 1, "seed": 12, "resume": resume})
        return calm, (await collect(replica.generate(PROMPTS[1], moved)))[0]

    calm, rest = asyncio.run(main())
    assert calm.token_ids[5:] == rest.token_ids and rest.finish_reason == "length"
    assert calm.text.endswith(rest.text) and rest.text
    with pytest.raises(ValueError, match="n must be 1"):
        GenerationParams(n=2, resume=Resume(token_ids=[1], text_chars=0))
    with pytest.raises(RequestError, match="nothing is left"):
        replica.generate(PROMPTS[1], GenerationParams(max_tokens=2, resume=Resume(token_ids=[1, 2], text_chars=0)))


def test_the_migration_bound_runs_from_the_failure_not_the_request(model_dirs: dict) -> None:
    """A request that ran longer than migration_timeout_s before its grid failed still moves to the rebuilt grid
    (the bound is how long it may wait after the failure, not its age)."""
    d = str(model_dirs["llama_gqa"])

    class SlowDying(DyingGrid):
        async def step_async(self, step: Any) -> Any:
            await asyncio.sleep(0.25)  # 6 steps before the failure: 1.5 s, past the 1 s bound
            return await super().step_async(step)

    async def main(replica: Replica) -> Any:
        return (await collect(replica.generate(PROMPTS[0], greedy(10))))[0]

    calm = asyncio.run(main(Replica(config(d), grid_factory=lambda: LocalGrid(d, 1, 1))))
    dying = Replica(config(d, migration_timeout_s=1.0), grid_factory=grids(lambda: SlowDying(d, 7),
                                                                            lambda: LocalGrid(d, 1, 1)))
    moved = asyncio.run(main(dying))
    assert dying.rebuilds == 1 and moved.error is None and moved.token_ids == calm.token_ids
