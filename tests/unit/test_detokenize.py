"""Incremental detokenization: same text as one whole decode, stop strings cut in the same place, linear work."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.detokenize import IncrementalDecoder, TextStream
from cluster.engine import TokenEvent


@pytest.fixture(scope="module")
def tokenizer(model_dirs: dict) -> Any:
    """The bundled byte-level BPE tokenizer (specials, multi-byte characters split over tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dirs["llama_gqa"])


class CountingTokenizer:
    """Wraps a tokenizer and counts the token ids it is asked to decode."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.decoded = inner, 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decoded += len(ids)
        return self.inner.decode(ids, **kwargs)


async def events(ids: list[int]) -> AsyncIterator[TokenEvent]:
    """An engine stream of `ids`, the last one with finish reason 'length'."""
    for i, token in enumerate(ids):
        yield TokenEvent(token, "length" if i == len(ids) - 1 else None)


def stream_text(tokenizer: Any, ids: list[int], stop: list[str]) -> tuple[str, str | None]:
    """All deltas of a TextStream over `ids`, and its finish reason."""
    async def main() -> tuple[str, str | None]:
        text, reason, tokens = "", None, []
        async for delta in TextStream(events(ids), tokenizer, stop):
            text, reason, tokens = text + delta.text, delta.finish_reason, tokens + delta.token_ids
        assert tokens == ids[:len(tokens)] and (reason == "stop" or tokens == ids)  # every token handed out once
        return text, reason
    return asyncio.run(main())


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 400), min_size=1, max_size=60))
def test_deltas_add_up_to_the_whole_decode(tokenizer: Any, ids: list[int]) -> None:
    """Random ids (specials, split UTF-8 characters): the deltas concatenate to decode(all ids)."""
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.step(t) for t in ids)
    assert text == decoder.text
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert whole.startswith(text) and (text == whole or whole[len(text):] == "\ufffd" * len(whole[len(text):]))


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(6, 400), min_size=2, max_size=40), cut=st.integers(1, 6))
def test_stop_strings_cut_where_a_whole_decode_would(tokenizer: Any, ids: list[int], cut: int) -> None:
    """A stop string taken from the middle of the text ends the stream just before its first occurrence."""
    whole = tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    stop = whole[len(whole) // 2:len(whole) // 2 + cut]
    if not stop or "\ufffd" in stop:
        return
    text, reason = stream_text(tokenizer, ids, [stop])
    assert reason == "stop" and text == whole[:whole.find(stop)]


def test_decode_work_grows_linearly_with_the_output(tokenizer: Any) -> None:
    """2,000 tokens decode about as many ids in total, not ~2,000^2 / 2 as a whole decode per token would."""
    from deployments.make_model import CORPUS

    ids = (tokenizer.encode(CORPUS, add_special_tokens=False) * 20)[:2000]
    counting = CountingTokenizer(tokenizer)
    decoder = IncrementalDecoder(counting)
    for t in ids:
        decoder.step(t)
    assert decoder.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded < 10 * len(ids)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 400), min_size=2, max_size=40), cut=st.integers(0, 40),
       stop=st.sampled_from([[], ["e"], ["\n\n"], ["the", "of "]]))
def test_a_resumed_stream_continues_exactly_where_the_lost_one_left_off(tokenizer: Any, ids: list[int], cut: int,
                                                                       stop: list[str]) -> None:
    """The deltas a client got before its replica was lost, then a stream primed with their tokens and text
    length over the remaining tokens: together the same text, tokens and finish as one undisturbed stream (text
    held back for a possible stop string is sent by the second stream, never twice or lost)."""
    from cluster.request import Resume

    async def deltas(stream: TextStream) -> list[Any]:
        return [d async for d in stream]

    whole = asyncio.run(deltas(TextStream(events(ids), tokenizer, stop)))
    got = whole[:min(cut, len(whole) - 1)]  # what reached the client; the choice was still open
    done = [t for d in got for t in d.token_ids]
    sent = "".join(d.text for d in got)
    rest = asyncio.run(deltas(TextStream(tail(ids, len(done)), tokenizer, stop,
                                  resume=Resume(token_ids=done, text_chars=len(sent)))))
    assert sent + "".join(d.text for d in rest) == "".join(d.text for d in whole)
    assert done + [t for d in rest for t in d.token_ids] == [t for d in whole for t in d.token_ids]
    assert rest[-1].finish_reason == whole[-1].finish_reason


async def tail(ids: list[int], start: int) -> AsyncIterator[TokenEvent]:
    """The engine stream of a resumed choice: the tokens after `start`, the last with finish reason 'length'."""
    for i in range(start, len(ids)):
        yield TokenEvent(ids[i], "length" if i == len(ids) - 1 else None)


def test_every_token_gets_its_delta_even_when_its_text_waits(tokenizer: Any) -> None:
    """A character split over two tokens: the first token's delta is empty (as vLLM streams it), the second's
    carries the character; a stream whose prefix may start a stop string sends empty deltas meanwhile."""
    ids = tokenizer.encode("é", add_special_tokens=False)
    if len(ids) < 2:  # some tokenizers hold é whole; a CJK character is split by every byte-level BPE
        ids = tokenizer.encode("語", add_special_tokens=False)
    assert len(ids) >= 2

    async def deltas(ids: list[int], stop: list[str]) -> list[tuple[str, list[int]]]:
        return [(d.text, d.token_ids) async for d in TextStream(events(ids), tokenizer, stop)]

    out = asyncio.run(deltas(ids, []))
    assert [ids_ for _, ids_ in out] == [[t] for t in ids]
    assert [text for text, _ in out[:-1]] == [""] * (len(ids) - 1) and out[-1][0] == tokenizer.decode(ids)
    ab = tokenizer.encode("ab ab", add_special_tokens=False)
    out = asyncio.run(deltas(ab, ["ab!"]))  # "ab" may start the stop string: held until the end shows it is not
    assert [ids_ for _, ids_ in out] == [[t] for t in ab]
    assert "".join(text for text, _ in out) == "ab ab" and out[0][0] == ""
