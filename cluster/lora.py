"""One replica's LoRA adapters: which names it serves, and which of them sit in the workers' `max_loras` slots.

A request for an adapter pins its slot for the request's life (loading the adapter into the least recently used
unpinned slot first if it is not resident), so a step never mixes more adapters than there are slots; a request
that finds every slot pinned by other adapters waits for one, it never fails. Each registration of a name gets a
fresh id, and the prefix cache roots that adapter's blocks at it: KV computed under one adapter (or the base
model) is never reused under another, nor under a re-registered name.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.request import ChoiceDelta, GenerationParams, RequestError

log = logging.getLogger("gridserve.lora")
Chunks = AsyncGenerator[list[ChoiceDelta], None]
# A runtime-loaded adapter's (folder, load number), or None (not loaded): a new number means new weights, even from
# the same folder (vLLM's load_inplace).
Lookup = Callable[[str], Awaitable[tuple[str, int] | None]]


class LoraGrid(Protocol):
    """What the registry needs of a grid: put an adapter into a slot on every worker, or empty one."""

    async def load_lora(self, slot: int, name: str, path: str) -> None:
        """Read, check and load the adapter into `slot` everywhere (ValueError naming it if bad)."""
        ...

    async def unload_lora(self, slot: int) -> None:
        """Empty `slot` everywhere."""
        ...


@dataclass
class Registered:
    """A served adapter: its folder and the id of this registration."""

    path: str
    uid: int
    static: bool  # from lora_modules (else loaded at runtime)
    version: int = 0  # the runtime catalog's load number


@dataclass
class Slot:
    """One slot of the workers: the adapter registration it holds, how many requests use it, when last used."""

    uid: int | None = None
    name: str | None = None
    path: str = ""
    pins: int = 0
    used: int = 0
    loaded: asyncio.Future[None] | None = None  # done once the workers hold the adapter
    draining: bool = False  # another adapter waits for it: no new pins, so it frees up (no starvation)


def prefix_root(uid: int) -> int:
    """The prefix-cache parent of an adapter's first block: negative and never -1 (the base model's)."""
    return -2 - uid


class LoraRegistry:
    """Adapter names -> folders, and the slot residency (LRU over `max_loras`) of one replica's grid."""

    def __init__(self, modules: dict[str, str], max_loras: int, grid: Callable[[], LoraGrid],
                 lookup: Lookup | None = None, base: str | None = None) -> None:
        self.grid, self.lookup, self.base = grid, lookup, base  # base: the served model's own name
        self._uids = itertools.count()
        self._clock = itertools.count(1)
        self.known = {name: Registered(path, next(self._uids), True) for name, path in modules.items()}
        self.slots = [Slot() for _ in range(max_loras)]
        self._waiters: list[asyncio.Future[None]] = []

    def resident(self) -> list[str]:
        """Adapters held in slots now (what routing prefers)."""
        return [s.name for s in self.slots if s.name is not None and s.loaded is not None and s.loaded.done()]

    async def resolve(self, name: str) -> Registered:
        """The registration serving `name` now (asking the app's runtime catalog when there is one);
        RequestError 404 if no adapter of that name is loaded."""
        reg = self.known.get(name)
        if reg is not None and reg.static:
            return reg
        found = await self.lookup(name) if self.lookup is not None and self.slots else None
        if found is None:
            self.known.pop(name, None)
            raise RequestError(f"model {name!r} does not exist; it is neither the served model nor a loaded LoRA "
                               "adapter (GET /v1/models lists them)", "model", 404, "model_not_found")
        path, version = found
        if reg is None or (reg.path, reg.version) != (path, version):  # newly loaded, or loaded again
            reg = self.known[name] = Registered(path, next(self._uids), False, version)
        return reg

    def stream(self, params: GenerationParams, run: Callable[[GenerationParams], Chunks]) -> Chunks:
        """`run(params)`, with the request's adapter resolved and its slot pinned until the stream ends when it
        names one (the served model's own name, as batch lines may give it, is the base model)."""
        if params.lora is None or params.lora == self.base:
            return run(params.model_copy(update={"lora": None}) if params.lora else params)
        return self._pinned(params.lora, params, run)

    async def _pinned(self, name: str, params: GenerationParams, run: Callable[[GenerationParams], Chunks]
                      ) -> Chunks:
        try:
            reg = await self.resolve(name)
            slot = await self.acquire(name, reg)
        except (RequestError, ValueError) as exc:
            yield [ChoiceDelta(i, "", [], "error", error=str(exc)) for i in range(params.n)]
            return
        try:
            chunks = run(params.model_copy(update={"lora_slot": (slot, prefix_root(reg.uid))}))
            async for chunk in chunks:
                yield chunk
        finally:
            self.release(slot)

    async def acquire(self, name: str, reg: Registered) -> int:
        """Pin a slot holding `reg` (loading it into the least recently used free slot if needed; waiting while
        every slot is pinned by other adapters); ValueError if the workers refuse the adapter.

        A request that has to wait makes the least recently used slot drain: it takes no new pins, so under
        steady traffic for the resident adapters it still frees up, and waiting adapters take turns."""
        if not self.slots:
            raise RequestError("this server runs without LoRA; set enable_lora: true to serve adapters", "model")
        while True:
            held = next((k for k, s in enumerate(self.slots) if s.uid == reg.uid and not s.draining), None)
            if held is not None:
                return await self._use(held)
            free = [k for k, s in enumerate(self.slots) if s.pins == 0]
            if free:
                break
            if not any(s.draining or s.uid == reg.uid for s in self.slots):
                min(self.slots, key=lambda s: s.used).draining = True
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        slot = next((k for k in free if self.slots[k].uid == reg.uid), min(free, key=lambda k: self.slots[k].used))
        if self.slots[slot].uid == reg.uid:  # drained but still holding this adapter: keep it, no reload
            self.slots[slot].draining = False
            return await self._use(slot)
        # The load holds a pin of its own until it ends, so no other adapter takes the slot meanwhile, and runs as
        # its own task, so a requester that goes away does not cut it short under the others waiting for it.
        s = self.slots[slot] = Slot(reg.uid, name, reg.path, 1, next(self._clock))
        s.loaded = asyncio.ensure_future(self._load(slot, s))
        s.loaded.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen even if nobody waits
        return await self._use(slot)

    async def _load(self, slot: int, s: Slot) -> None:
        """Put the adapter of `s` into `slot` on the grid; on failure the slot is left empty (its pins drain)."""
        try:
            assert s.name is not None
            await self.grid().load_lora(slot, s.name, s.path)
            log.info("LoRA adapter %r loaded into slot %d", s.name, slot)
        except BaseException:
            s.uid = s.name = None
            raise
        finally:
            self.release(slot)

    async def _use(self, slot: int) -> int:
        """Pin `slot` (waiting for its adapter to finish loading)."""
        s = self.slots[slot]
        s.pins += 1
        s.used = next(self._clock)
        try:
            assert s.loaded is not None, "a slot with an adapter has a load future"
            await asyncio.shield(s.loaded)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: int) -> None:
        """Unpin `slot`; waiters for a free slot look again."""
        self.slots[slot].pins -= 1
        if self.slots[slot].pins == 0:
            self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def restore(self) -> None:
        """Load every resident adapter into the same slot of a freshly built grid (requests resume on it)."""
        for slot, s in enumerate(self.slots):
            if s.name is not None:
                await self.grid().load_lora(slot, s.name, s.path)
