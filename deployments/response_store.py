"""Stored responses of the Responses API (`store: true`), for `previous_response_id` and `GET /v1/responses/{id}`.

One small named actor per app holds them, so every ingress replica reads what any replica stored. It is bounded by
count, bytes and age (oldest evicted first) and lives in memory only, on the head node (a worker host's loss
spares it): a Ray cluster restart forgets every stored response. It is detached, so it outlives the ingress replica
that made it (autoscaling may remove that one).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import ray
from ray.exceptions import RayActorError

from cluster.placement import HEAD_NODE

MAX_RESPONSES = 10_000
MAX_BYTES = 256 * 2**20  # the records' JSON, summed
MAX_AGE_S = 6 * 3600.0


class BoundedStore:
    """Records by id, oldest first; a put evicts the oldest until count and bytes fit, a read drops expired ones."""

    def __init__(self, max_items: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES,
                 max_age_s: float = MAX_AGE_S) -> None:
        self.max_items, self.max_bytes, self.max_age_s = max_items, max_bytes, max_age_s
        self.items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    def put(self, key: str, record: bytes, now: float | None = None) -> bool:
        """Store `record` (replacing one under `key`); False when it alone exceeds the byte limit."""
        if len(record) > self.max_bytes:
            return False
        self.delete(key)
        self.items[key] = (time.monotonic() if now is None else now, record)
        self.bytes += len(record)
        while len(self.items) > self.max_items or self.bytes > self.max_bytes:
            self._pop_oldest()
        return True

    def get(self, key: str, now: float | None = None) -> bytes | None:
        """The record under `key`, unless it was evicted or is older than the age limit."""
        self.expire(time.monotonic() if now is None else now)
        found = self.items.get(key)
        return None if found is None else found[1]

    def delete(self, key: str) -> bool:
        """Forget `key`; whether it was there."""
        found = self.items.pop(key, None)
        if found is not None:
            self.bytes -= len(found[1])
        return found is not None

    def expire(self, now: float) -> None:
        """Drop records older than the age limit (insertion order is age order)."""
        while self.items and now - next(iter(self.items.values()))[0] > self.max_age_s:
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, (_, record) = self.items.popitem(last=False)
        self.bytes -= len(record)


@ray.remote(num_cpus=0)
class ResponseStore:
    """The app's stored responses (a BoundedStore in an actor)."""

    def __init__(self) -> None:
        self.store = BoundedStore()

    def put(self, key: str, record: bytes) -> bool:
        """Store a record."""
        return self.store.put(key, record)

    def get(self, key: str) -> bytes | None:
        """A record, or None."""
        return self.store.get(key)

    def delete(self, key: str) -> bool:
        """Forget a record."""
        return self.store.delete(key)


def store_actor(app: str) -> Any:
    """The app's store, made by the first ingress replica that asks for it."""
    return ResponseStore.options(name=f"gridserve-responses-{app}", get_if_exists=True,  # type: ignore[attr-defined]
                                 lifetime="detached", resources=HEAD_NODE).remote()


class StoreClient:
    """An ingress replica's handle on the store; a lost store is made again (empty) on the next call."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.actor: Any = None

    async def call(self, method: str, *args: Any) -> Any:
        """`method` on the store actor, retried once on a new store if the old one is gone."""
        try:
            return await self._call(method, *args)
        except RayActorError:  # the store died with its node: what it held is gone
            self.actor = None
            return await self._call(method, *args)

    async def _call(self, method: str, *args: Any) -> Any:
        if self.actor is None:
            self.actor = store_actor(self.app)
        return await getattr(self.actor, method).remote(*args)
