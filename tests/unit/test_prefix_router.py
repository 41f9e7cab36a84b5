"""Prefix-aware routing: the router's choice from replica reports, its own recent routes, load, and call kind."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from cluster.blocks import BlockManager, prompt_digests
from deployments.prefix_router import PrefixAwareRouter

BS = 4
SYSTEM = list(range(100, 124))  # 6 full blocks shared by "users"
DEPLOYMENT = DeploymentID(name="LLMServer", app_name="test")


class FakeReplica:
    """What the router reads of a replica: its id and its latest routing report."""

    def __init__(self, name: str, cached: list[int] | None = None) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.routing_stats: dict[str, Any] = {}
        self.report(cached or [])

    def report(self, cached_prompt: list[int]) -> None:
        """A new report: the digests a replica's BlockManager gives after computing `cached_prompt`."""
        bm = BlockManager(64, BS, prefix_caching=True)
        table: list[int] = []
        bm.grow(table, len(cached_prompt))
        bm.register(table, cached_prompt, len(cached_prompt), 0, -1)
        self.routing_stats = {"block_size": BS, "digests": bm.digests(1000), "running": 0, "waiting": 0}


def router(imbalance: int = 8) -> PrefixAwareRouter:
    """A router as Serve builds one for a handle, with our kwargs."""
    r = PrefixAwareRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN,
                          use_replica_queue_len_cache=True)
    r.initialize_state(imbalance=imbalance, block_size=BS)
    return r


def request(prompt: list[int], method: str = "generate") -> PendingRequest:
    """A handle call as the ingress makes it: generate(prompt_ids, params, n, grammar) (inside an event loop)."""
    return PendingRequest(args=[prompt, None, 1, None], kwargs={},
                          metadata=RequestMetadata(request_id="r", internal_request_id="i", call_method=method))


def choose(r: PrefixAwareRouter, replicas: list[FakeReplica], prompt: list[int], method: str = "generate"
           ) -> list[list[FakeReplica]]:
    """One routing decision."""
    async def decide() -> list[list[FakeReplica]]:
        return await r.choose_replicas(replicas, request(prompt, method))  # type: ignore[arg-type]

    return asyncio.run(decide())


def routed(r: PrefixAwareRouter, prompt: list[int], to: FakeReplica) -> None:
    """Tell the router it sent `prompt` to `to`."""
    async def tell() -> None:
        r.on_request_routed(request(prompt), to.replica_id, None)

    asyncio.run(tell())


def test_digests_of_a_prompt_match_what_a_replica_reports() -> None:
    """The router hashes a prompt exactly as the replica's block manager registers it."""
    a = FakeReplica("a", SYSTEM + [1, 2, 3, 4])
    assert set(prompt_digests(SYSTEM, BS)) <= set(a.routing_stats["digests"])
    assert prompt_digests(SYSTEM + [9] * 4, BS)[-1] not in a.routing_stats["digests"]


def test_replica_holding_the_longest_prefix_comes_first() -> None:
    """Two replicas hold some of the prompt; the longer holder is the first rank, the fallback follows."""
    short, long_ = FakeReplica("short", SYSTEM[:8]), FakeReplica("long", SYSTEM)
    for _ in range(10):
        ranks = choose(router(), [short, long_], SYSTEM + [7, 7, 7, 7, 7])
        assert ranks[0] == [long_] and len(ranks) == 2


def test_no_holder_or_no_prompt_falls_back_to_power_of_two() -> None:
    """A prompt nobody caches, or a call that carries no prompt, gets two random replicas in one rank."""
    reps = [FakeReplica("a", SYSTEM), FakeReplica("b"), FakeReplica("c")]
    r = router()
    for ranks in (choose(r, reps, [1, 2, 3, 4, 5, 6, 7, 8]), choose(r, reps, SYSTEM, "status")):
        assert len(ranks) == 1 and len(ranks[0]) == 2 and ranks[0][0] is not ranks[0][1]


def test_an_overloaded_holder_loses_its_claim() -> None:
    """The holder is skipped once it runs more than `imbalance` requests above the least-loaded replica."""
    holder, idle = FakeReplica("holder", SYSTEM), FakeReplica("idle")
    r = router(imbalance=4)
    r.on_new_queue_len_info(holder.replica_id, 4)
    r.on_new_queue_len_info(idle.replica_id, 0)
    assert choose(r, [holder, idle], SYSTEM)[0] == [holder]  # 4 above: still within the threshold
    r.on_new_queue_len_info(holder.replica_id, 5)
    assert len(choose(r, [holder, idle], SYSTEM)) == 1  # 5 above: power of two


def test_prompts_routed_lately_count_as_cached_until_reports_catch_up() -> None:
    """A burst sharing a new system prompt follows its first request, before any replica reports it."""
    a, b = FakeReplica("a"), FakeReplica("b")
    r = router()
    routed(r, SYSTEM + [1, 1, 1, 1], b)
    for _ in range(10):
        assert choose(r, [a, b], SYSTEM + [2, 2, 2, 2])[0] == [b]


def test_a_new_report_replaces_the_old_one() -> None:
    """When a replica's cache drops a prefix (a new report without it), the router stops preferring it."""
    a, b = FakeReplica("a", SYSTEM), FakeReplica("b")
    r = router()
    assert choose(r, [a, b], SYSTEM)[0] == [a]
    a.report([])
    assert len(choose(r, [a, b], SYSTEM)) == 1


@pytest.mark.parametrize("seed", ["0", "1", "12345"])
def test_digests_agree_across_processes(seed: str) -> None:
    """Routers and replicas run in different processes with different hash seeds: the digests must not depend
    on them."""
    import subprocess
    import sys

    code = "from cluster.blocks import prompt_digests; print(prompt_digests(list(range(100, 124)), 4))"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "PYTHONPATH": "."},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(prompt_digests(SYSTEM, BS))
