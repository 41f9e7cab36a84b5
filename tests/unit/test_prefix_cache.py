"""Prefix caching: block reuse and eviction rules, the scheduler skipping cached prefill, and unchanged tokens."""
from __future__ import annotations

import asyncio

from actors.shard.sampler import SamplingParams
from cluster.blocks import BlockManager
from cluster.scheduler import Scheduler, Sequence
from tests.reference import hf_greedy

BS = 4
GREEDY = SamplingParams(temperature=0.0)


def computed(bm: BlockManager, tokens: list[int]) -> list[int]:
    """A table holding `tokens`, every full block registered as if a step had computed it."""
    table: list[int] = []
    bm.grow(table, len(tokens))
    bm.register(table, tokens, len(tokens), 0, -1)
    return table


def test_match_takes_full_shared_blocks_only() -> None:
    """A prompt sharing 2 full blocks gets exactly those blocks, referenced twice; the last token stays uncached."""
    bm = BlockManager(8, BS, prefix_caching=True)
    a = computed(bm, list(range(10)))  # blocks: [0-3] [4-7] [8 9 . .]
    blocks, _ = bm.match_prefix(list(range(8)) + [99, 98])
    assert blocks == a[:2] and [bm.refs[b] for b in a] == [2, 2, 1]
    exact, _ = bm.match_prefix(list(range(8)))  # whole prompt cached: its last block is recomputed for logits
    assert exact == a[:1]
    assert bm.match_prefix([0, 1, 2, 5, 4, 5, 6, 7, 8])[0] == []  # differs inside the first block


def test_released_blocks_stay_reusable_until_space_is_needed() -> None:
    """Freed registered blocks are matched again; when the cache is full the oldest ones are recycled."""
    bm = BlockManager(4, BS, prefix_caching=True)
    a = computed(bm, list(range(8)))
    bm.release(a)
    assert bm.num_available == 4 and bm.usage == 0.0
    again, _ = bm.match_prefix(list(range(9)))
    assert len(again) == 2
    bm.release(again)
    other: list[int] = []
    bm.grow(other, 4 * BS)  # needs every block: the cached content is dropped
    assert bm.match_prefix(list(range(9)))[0] == []
    bm.release(other)
    assert bm.num_available == 4


def test_recycled_parent_block_does_not_alias_its_old_children() -> None:
    """A child block is keyed by its parent's content, not its block id, so reuse of the id cannot fake a hit."""
    bm = BlockManager(2, BS, prefix_caching=True)
    parent, child = computed(bm, [1, 1, 1, 1, 2, 2, 2, 2])
    bm.release([parent, child])
    bm.cached.move_to_end(child)  # make the parent the one recycled first (release order alone never does)
    b: list[int] = []
    bm.grow(b, 1)
    assert b == [parent]
    bm.register(b, [9, 9, 9, 9], 4, 0, -1)  # new content in the old parent's block
    assert bm.match_prefix([9, 9, 9, 9, 2, 2, 2, 2, 0])[0] == [parent]  # the old child is not reachable
    assert bm.match_prefix([1, 1, 1, 1, 2, 2, 2, 2, 0])[0] == []


def test_same_content_computed_twice_is_shared_once() -> None:
    """Two sequences that computed the same block at once: the first registration wins, the copy stays private."""
    bm = BlockManager(6, BS, prefix_caching=True)
    a, b = computed(bm, list(range(8))), computed(bm, list(range(8)))
    assert set(a).isdisjoint(b)
    assert bm.match_prefix(list(range(9)))[0] == a
    bm.release(b)
    assert all(block in bm.free for block in b)  # never registered: plain free blocks


def test_scheduler_prefills_only_the_uncached_suffix() -> None:
    """After one request, a second with the same 2-block prefix starts with 8 cached tokens and sends 3 (in the
    same step as the first one's decode)."""
    sched = Scheduler(BlockManager(16, BS, prefix_caching=True), 4, 64, 64)
    first = Sequence(0, list(range(10)), GREEDY, 2)
    sched.add(first)
    batch = sched.schedule()
    sched.update(batch, type("Out", (), {"token_ids": [50]})())
    second = Sequence(1, list(range(8)) + [70, 71, 72], GREEDY, 2)
    sched.add(second)
    batch = sched.schedule()
    assert batch == [first, second] and second.num_cached == 8
    step = sched.build_step(batch)
    assert step.token_ids.tolist() == [50, 70, 71, 72] and step.positions.tolist() == [10, 8, 9, 10]
    assert step.block_tables[1][:2] == first.block_table[:2]
    assert sched.prefix_hit_tokens == 8 and sched.admitted_tokens == 10 + 11
    assert (first.cached_prompt_tokens, second.cached_prompt_tokens) == (0, 8)  # what each client is told


def test_first_token_event_tells_the_cached_prompt_tokens(model_dirs: dict) -> None:
    """A request after one with the same 3-block prefix learns, on its first token, that 12 tokens were cached."""
    from cluster.engine import AsyncEngine
    from tests.local_grid import LocalGrid

    shared = [3, 17, 5, 42, 8, 11, 2, 60, 33, 9, 14, 21, 7]
    grid = LocalGrid(str(model_dirs["llama_gqa"]), 1, 1, num_blocks=32, block_size=BS)

    async def run() -> list[list[int | None]]:
        engine = AsyncEngine(grid, BS, 8, 256, 256)
        told = []
        for tail in ([1], [2, 3]):
            told.append([ev.cached_tokens async for ev in engine.generate(shared + tail, GREEDY, 3)])
        return told

    assert asyncio.run(run()) == [[0, None, None], [12, None, None]]


def test_engine_tokens_unchanged_with_shared_prefixes(model_dirs: dict) -> None:
    """Requests sharing a long prefix give HF's greedy tokens with prefix caching on, and do hit the cache."""
    from cluster.engine import AsyncEngine
    from cluster.generate import Request, generate_all
    from tests.local_grid import LocalGrid
    from tests.reference import greedy

    shared = [3, 17, 5, 42, 8, 11, 2, 60, 33, 9, 14, 21, 7]
    prompts = [shared + tail for tail in ([1], [2, 3], [4, 5, 6], [])] + [shared[:6] + [40]]
    want = [hf_greedy(model_dirs["llama_gqa"], p, 6)[0] for p in prompts]
    grid = LocalGrid(str(model_dirs["llama_gqa"]), 2, 2, num_blocks=32, block_size=BS)

    async def run(first_alone: bool) -> tuple[list, AsyncEngine]:
        engine = AsyncEngine(grid, BS, 8, 256, 256)
        reqs = [Request(i, p, greedy(6)) for i, p in enumerate(prompts)]
        head = await generate_all(engine, reqs[:1]) if first_alone else []
        rest = await generate_all(engine, reqs[len(head):])
        return head + rest, engine

    for first_alone in (True, False):  # cache warmed by a finished request, or filled while all run together
        results, engine = asyncio.run(run(first_alone))
        assert [r.token_ids for r in results] == want
        if first_alone:
            assert engine.scheduler.prefix_hit_tokens >= 3 * 12 + 4
        assert engine.scheduler.blocks.num_available == 32


def test_prefix_sharing_survives_preemption(model_dirs: dict) -> None:
    """With too few blocks for everyone, sequences that share blocks are preempted and resumed; tokens stay HF's."""
    from cluster.engine import AsyncEngine
    from cluster.generate import Request, generate_all
    from tests.local_grid import LocalGrid
    from tests.reference import greedy

    shared = [3, 17, 5, 42, 8, 11, 2, 60]
    prompts = [shared + [i + 1, 2 * i + 7] for i in range(6)]
    want = [hf_greedy(model_dirs["llama_gqa"], p, 10)[0] for p in prompts]
    grid = LocalGrid(str(model_dirs["llama_gqa"]), 1, 1, num_blocks=12, block_size=BS)

    async def run() -> tuple[list, AsyncEngine]:
        engine = AsyncEngine(grid, BS, 6, 256, 256)
        head = await generate_all(engine, [Request(0, prompts[0], greedy(10))])
        rest = await generate_all(engine, [Request(i, p, greedy(10)) for i, p in enumerate(prompts)
                                           if i])
        return head + rest, engine

    results, engine = asyncio.run(run())
    blocks = engine.scheduler.blocks
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.prefix_hit_tokens >= 5 * 8
    assert [r.token_ids for r in results] == want
    assert blocks.num_available == 12 and not any(blocks.refs)
