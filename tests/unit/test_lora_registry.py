"""The LoRA slot registry over a fake grid: LRU replacement, pins while loading, waiting for a slot, failed and
abandoned loads, fresh prefix-cache roots per registration."""
from __future__ import annotations

import asyncio

import pytest

from cluster.lora import LoraRegistry, prefix_root
from cluster.request import RequestError


class FakeGrid:
    """Records loads; a load takes `delay` s; adapters named 'bad*' are refused like a bad PEFT folder."""

    def __init__(self, delay: float = 0.01) -> None:
        self.loads: list[tuple[int, str]] = []
        self.delay = delay

    async def load_lora(self, slot: int, name: str, path: str) -> None:
        await asyncio.sleep(self.delay)
        if name.startswith("bad"):
            raise ValueError(f"LoRA adapter {name!r}: no adapter_config.json in {path!r}")
        self.loads.append((slot, name))

    async def unload_lora(self, slot: int) -> None:
        """Not used by the registry (a slot is overwritten when reused)."""


def registry(grid: FakeGrid, slots: int = 2, catalog: dict[str, tuple[str, int]] | None = None) -> LoraRegistry:
    """Adapters a, b, c, bad from lora_modules; `catalog` plays the app's runtime catalog."""
    modules = {n: f"/adapters/{n}" for n in ("a", "b", "c", "bad")}

    async def lookup(name: str) -> tuple[str, int] | None:
        return (catalog or {}).get(name)
    return LoraRegistry(modules, slots, lambda: grid, lookup)


async def use(reg: LoraRegistry, name: str) -> int:
    """Resolve and pin `name`; returns its slot."""
    return await reg.acquire(name, await reg.resolve(name))


def test_lru_replacement_and_reuse_of_resident_adapters() -> None:
    """Resident adapters are reused without a load; a third replaces the least recently used unpinned one."""
    grid = FakeGrid()
    reg = registry(grid)

    async def main() -> None:
        sa, sb = await use(reg, "a"), await use(reg, "b")
        reg.release(sa), reg.release(sb)
        reg.release(await use(reg, "a"))  # a is now the most recently used
        sc = await use(reg, "c")
        assert sc == sb and sorted(reg.resident()) == ["a", "c"]
        reg.release(sc)

    asyncio.run(main())
    assert grid.loads == [(0, "a"), (1, "b"), (1, "c")]


def test_a_request_waits_for_a_slot_and_never_fails() -> None:
    """With both slots pinned by other adapters, a third adapter's request waits until one is released."""
    grid = FakeGrid()
    reg = registry(grid)

    async def main() -> list[str]:
        order: list[str] = []
        sa, sb = await use(reg, "a"), await use(reg, "b")
        waiting = asyncio.ensure_future(use(reg, "c"))
        await asyncio.sleep(0.05)
        order.append("c waiting" if not waiting.done() else "c ran early")
        reg.release(sb)
        slot = await waiting
        order.append(f"c in slot {slot}")
        reg.release(slot), reg.release(sa)
        return order

    assert asyncio.run(main()) == ["c waiting", "c in slot 1"]


def test_failed_load_reaches_every_waiter_and_leaves_the_slot_empty() -> None:
    """Two requests for a bad adapter both get its ValueError; the slot holds nothing and is free again."""
    grid = FakeGrid()
    reg = registry(grid, slots=1)

    async def main() -> None:
        results = await asyncio.gather(use(reg, "bad"), use(reg, "bad"), return_exceptions=True)
        assert all(isinstance(r, ValueError) and "'bad'" in str(r) for r in results)
        assert reg.slots[0].pins == 0 and reg.slots[0].name is None and reg.resident() == []
        reg.release(await use(reg, "a"))

    asyncio.run(main())
    assert grid.loads == [(0, "a")]


def test_abandoned_load_finishes_for_the_others() -> None:
    """A requester cancelled mid-load does not cut the load short for another request waiting on it."""
    grid = FakeGrid(delay=0.05)
    reg = registry(grid, slots=1)

    async def main() -> int:
        first = asyncio.ensure_future(use(reg, "a"))
        second = asyncio.ensure_future(use(reg, "a"))
        await asyncio.sleep(0.01)
        first.cancel()
        slot = await second
        assert reg.slots[slot].pins == 1
        reg.release(slot)
        return slot

    assert asyncio.run(main()) == 0 and grid.loads == [(0, "a")]


def test_runtime_adapters_come_from_the_catalog_with_fresh_roots() -> None:
    """A name only the catalog knows resolves; unloaded it is a 404; loaded again, even from the same folder
    (new weights there), it is a new registration: a new prefix root, and a slot load instead of the old slot."""
    catalog = {"rt": ("/adapters/rt", 1)}
    grid = FakeGrid()
    reg = registry(grid, catalog=catalog)

    async def main() -> None:
        first = await reg.resolve("rt")
        assert await reg.resolve("rt") is first  # unchanged in the catalog: the same registration
        reg.release(await reg.acquire("rt", first))
        catalog.clear()
        with pytest.raises(RequestError) as err:
            await reg.resolve("rt")
        assert err.value.status == 404
        catalog["rt"] = ("/adapters/rt", 2)
        second = await reg.resolve("rt")
        assert second.path == first.path and prefix_root(second.uid) != prefix_root(first.uid) < -1
        reg.release(await reg.acquire("rt", second))

    asyncio.run(main())
    assert [name for _, name in grid.loads] == ["rt", "rt"]  # the second registration is loaded again


def test_waiting_adapters_take_turns_under_steady_traffic() -> None:
    """One slot held by a stream of requests for `a`: once `b` waits, new `a` requests queue behind it (the slot
    drains), so `b` runs, then `a` again: no starvation."""
    grid = FakeGrid()
    reg = registry(grid, slots=1)

    async def main() -> list[str]:
        order: list[str] = []

        async def request(name: str, hold_s: float) -> None:
            slot = await use(reg, name)
            order.append(name)
            await asyncio.sleep(hold_s)
            reg.release(slot)

        first = asyncio.ensure_future(request("a", 0.05))
        await asyncio.sleep(0.02)  # a is loaded and running
        waiting_b = asyncio.ensure_future(request("b", 0.01))
        await asyncio.sleep(0.005)
        later_a = asyncio.ensure_future(request("a", 0.01))  # arrives while b waits: must not overtake it
        await asyncio.gather(first, waiting_b, later_a)
        return order

    assert asyncio.run(main()) == ["a", "b", "a"]
    assert grid.loads == [(0, "a"), (0, "b"), (0, "a")]
