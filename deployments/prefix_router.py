"""A Ray Serve request router that sends a prompt to the replica whose KV cache already holds its longest prefix.

Ray Serve LLM's prefix router keeps its own approximate tree of the texts it routed. This one routes on what the
replicas really cache: each reports the chained digests of its reusable KV blocks (`record_routing_stats`, from
`cluster.blocks`), and the router hashes the prompt's blocks the same way and counts the leading ones a replica
holds. Between reports (they come every `request_routing_stats_period_s`), prompts the router itself just sent
somewhere count as held there, so a burst of requests sharing a new system prompt follows its first one instead
of scattering until the next report. A replica loaded beyond the imbalance threshold loses its claim: then the
choice is Serve's power of two (two random replicas, the shorter queue).
"""
from __future__ import annotations

import random
import time
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.blocks import prompt_digests

ROUTING_STATS_PERIOD_S = 1.0  # how often replicas report their cached blocks to the router

GENERATE = "generate"  # the LLMServer method whose first argument is the prompt's token ids
OWN_ROUTES_TTL_S = 10.0  # how long a prompt this router sent counts as cached there without a report saying so


class PrefixAwareRouter(FIFOMixin, RequestRouter):
    """Longest cached prefix first (within the imbalance threshold), else power of two choices."""

    # Serve calls it with request_router_kwargs, which router_config() fills with exactly these names.
    def initialize_state(self, imbalance: int = 8, block_size: int = 16) -> None:  # type: ignore[override]
        """`imbalance`: ongoing requests above the least-loaded replica beyond which a prefix match is ignored;
        `block_size`: the replicas' KV block size (their reports carry it too)."""
        self.imbalance, self.block_size = imbalance, block_size
        self.reported: dict[ReplicaID, tuple[list[int], set[int]]] = {}  # latest report list, its digests as a set
        self.own: dict[ReplicaID, dict[int, float]] = {}  # digest -> expiry, for prompts routed here recently

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas to try: the best prefix holder first (if any and not overloaded), then two random."""
        candidate_replicas = self.adapter_holders(candidate_replicas, adapter_of(pending_request))
        fallback = power_of_two(candidate_replicas)
        prompt = prompt_of(pending_request)
        if not prompt or len(candidate_replicas) < 2:
            return fallback
        best = self.best_holder(candidate_replicas, prompt_digests(prompt, self.block_size))
        if best is None:
            return fallback
        return [[best], [r for r in fallback[0] if r.replica_id != best.replica_id] or fallback[0]]

    def adapter_holders(self, replicas: list[RunningReplica], adapter: str | None) -> list[RunningReplica]:
        """For a LoRA request, the replicas that hold its adapter (no load to wait for), unless none does or they
        are all loaded beyond the imbalance threshold; otherwise every replica."""
        if adapter is None:
            return replicas
        holders = [r for r in replicas if adapter in (r.routing_stats or {}).get("loras", ())]
        if not holders or min(map(self.load, holders)) - min(map(self.load, replicas)) > self.imbalance:
            return replicas
        return holders

    def best_holder(self, replicas: list[RunningReplica], digests: list[int]) -> RunningReplica | None:
        """The replica holding the most leading blocks of the prompt (ties: the less loaded), unless it holds none
        or is loaded beyond the threshold."""
        now = time.monotonic()
        scored = [(self.held(r, digests, now), -self.load(r), r) for r in replicas]
        hit, neg_load, best = max(scored, key=lambda s: (s[0], s[1]))
        if hit == 0 or -neg_load - min(-s[1] for s in scored) > self.imbalance:
            return None
        return best

    def held(self, replica: RunningReplica, digests: list[int], now: float) -> int:
        """Leading blocks of the prompt that `replica` reported cached, or was sent by this router lately."""
        reported, own = self.cached_set(replica), self.own.get(replica.replica_id, {})
        count = 0
        for d in digests:
            if d not in reported and own.get(d, 0.0) < now:
                break
            count += 1
        return count

    def cached_set(self, replica: RunningReplica) -> set[int]:
        """The digests of the replica's latest report, as a set built once per report."""
        stats = replica.routing_stats or {}
        listed = stats.get("digests", [])
        known = self.reported.get(replica.replica_id)
        if known is None or known[0] is not listed:  # a new report (the old list is held, so `is` is safe)
            known = self.reported[replica.replica_id] = (listed, set(listed))
            if "block_size" in stats:
                self.block_size = stats["block_size"]
        return known[1]

    def load(self, replica: RunningReplica) -> int:
        """Ongoing requests as this router last knew them (sent minus finished, refreshed by Serve's probes)."""
        known = self.replica_queue_len_cache.get(replica.replica_id)
        if known is not None:
            return known
        stats = replica.routing_stats or {}
        return int(stats.get("running", 0) + stats.get("waiting", 0))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Count the prompt as cached where it went, until the replica's own reports can say so."""
        prompt = prompt_of(pending_request)
        if not prompt:
            return
        now = time.monotonic()
        own = self.own.setdefault(replica_id, {})
        if len(own) > 4 * 65536:  # bound memory: drop what expired
            for d in [d for d, t in own.items() if t < now]:
                del own[d]
        for d in prompt_digests(prompt, self.block_size):
            own[d] = now + OWN_ROUTES_TTL_S

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget a dead replica's cache."""
        super().on_replica_actor_died(replica_id)
        self.reported.pop(replica_id, None)
        self.own.pop(replica_id, None)


def prompt_of(pending_request: PendingRequest | None) -> list[int] | None:
    """The prompt's token ids when the request is a generation (other calls carry none)."""
    if pending_request is None or pending_request.metadata.call_method != GENERATE or not pending_request.args:
        return None
    prompt = pending_request.args[0]
    return prompt if isinstance(prompt, list) else None


def adapter_of(pending_request: PendingRequest | None) -> str | None:
    """The LoRA adapter a generation asks for (its GenerationParams, the second argument), or None."""
    if pending_request is None or pending_request.metadata.call_method != GENERATE or len(pending_request.args) < 2:
        return None
    return getattr(pending_request.args[1], "lora", None)


def power_of_two(replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
    """Serve's default choice: two random replicas in one rank (the router probes both, takes the shorter queue)."""
    return [random.sample(replicas, min(2, len(replicas)))] if replicas else []


def router_config(imbalance: int, block_size: int) -> Any:
    """Serve's settings for this router on a deployment."""
    from ray.serve.config import RequestRouterConfig

    # ray's model is built on its pydantic-v1 shim, which mypy reads with the wrong field types
    return RequestRouterConfig(request_router_class=PrefixAwareRouter,  # type: ignore[arg-type]
                               request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,  # type: ignore[arg-type]
                               request_router_kwargs={"imbalance": imbalance, "block_size": block_size})
