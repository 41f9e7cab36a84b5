"""Structured outputs through the engine on in-process grids: every finished output validates against its
schema, at every (tp, pp) layout, with n > 1 per schema and with KV-cache preemption."""
from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import pytest

from actors.shard.sampler import SamplingParams
from cluster.engine import AsyncEngine
from cluster.structured import GrammarMatchers, GrammarSpec
from tests.json_schemas import random_schema
from tests.local_grid import LocalGrid


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama whose vocabulary is its tokenizer's."""
    from deployments.make_model import write_model

    return str(write_model(tmp_path_factory.mktemp("grammar") / "tiny", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, seed=5))


async def run(engine: AsyncEngine, prompt: list[int], spec: GrammarSpec | None, seed: int,
              max_tokens: int) -> tuple[list[int], str | None]:
    """One request to the end: its tokens and finish reason."""
    ids, reason = [], None
    async for ev in engine.generate(prompt, SamplingParams(temperature=1.0, seed=seed), max_tokens, grammar=spec):
        assert ev.error is None, ev.error
        ids.append(ev.token_id)
        reason = ev.finish_reason
    return ids, reason


def engine_over(grid: LocalGrid, tok: object, budget: int, max_model_len: int) -> AsyncEngine:
    """An engine with grammar matchers over the grid's model (vocabulary and stop tokens from its spec)."""
    spec = grid.stages[-1][0].spec
    matchers = GrammarMatchers(tok, spec.vocab_size, spec.eos_token_ids)
    return AsyncEngine(grid, 4, 16, budget, max_model_len, spec.eos_token_ids, grammars=matchers)


@pytest.mark.parametrize("tp,pp,budget", [(1, 1, 512), (2, 1, 512), (1, 2, 512), (2, 2, 512), (1, 1, 24)])
def test_every_output_validates_against_its_schema(model_dir: str, tp: int, pp: int, budget: int) -> None:
    """8 random schemas x n=2 at once on a cache small enough to preempt: all outputs stop and validate (also
    with a step budget of 24, where prompts and recomputed sequences go in chunks beside 16 decodes)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(tp * 10 + pp)
    schemas = [random_schema(rng) for _ in range(8)]
    grid = LocalGrid(model_dir, tp, pp, num_blocks=56, block_size=4, max_model_len=512)
    prompt = tok.encode("Answer in JSON: the quick brown fox")

    async def main() -> tuple[list, int]:
        engine = engine_over(grid, tok, budget, 512)
        jobs = [run(engine, prompt, GrammarSpec("json_schema", json.dumps(s)), 100 * i + k, 200)
                for i, s in enumerate(schemas) for k in range(2)]
        results = await asyncio.gather(*jobs)
        return results, engine

    results, engine = asyncio.run(main())
    for i, (ids, reason) in enumerate(results):
        assert reason == "stop", (schemas[i // 2], tok.decode(ids))
        jsonschema.validate(json.loads(tok.decode(ids[:-1])), schemas[i // 2])
    assert engine.scheduler.num_preemptions > 0  # matchers survived recompute
    matchers = engine.scheduler.grammars
    assert matchers.compiles == len(schemas)  # once per schema, not per choice
    assert not matchers.live  # every finished sequence's matcher was released


def test_regex_choice_and_free_rows_share_a_batch(model_dir: str) -> None:
    """Constrained and unconstrained sequences in one batch: each constraint holds, free rows stay free."""
    import re

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    grid = LocalGrid(model_dir, 1, 2, num_blocks=128, block_size=4, max_model_len=256)
    prompt = tok.encode("Hello, world!")
    regex, choices = r"[0-9]{3}-[a-c]{2,4}", ["the cat", "the dog", "a \"fox\""]

    async def main() -> list:
        engine = engine_over(grid, tok, 256, 256)
        jobs = [run(engine, prompt, GrammarSpec("regex", regex), s, 40) for s in range(3)]
        jobs += [run(engine, prompt, GrammarSpec("choice", json.dumps(choices)), s, 40) for s in range(3)]
        jobs += [run(engine, prompt, None, s, 20) for s in range(2)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for ids, reason in results[:3]:
        assert reason == "stop" and re.fullmatch(regex, tok.decode(ids[:-1])), tok.decode(ids)
    for ids, reason in results[3:6]:
        assert reason == "stop" and tok.decode(ids[:-1]) in choices
    assert all(len(ids) == 20 for ids, _ in results[6:])  # free rows ran to max_tokens (no EOS forced)


def test_invalid_grammar_is_reported_without_a_tokenizer() -> None:
    """Bad schemas and regexes are caught before any step runs (the API turns this into a 400)."""
    assert GrammarSpec("json_schema", json.dumps({"type": "objekt"})).error()
    assert GrammarSpec("regex", "a(").error()
    assert GrammarSpec("json_schema", json.dumps({"type": "object"})).error() is None
