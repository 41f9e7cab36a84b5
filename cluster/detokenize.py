"""Incremental detokenization with stop strings: token events in, text deltas out, O(1) decode work per token."""
from __future__ import annotations

from typing import Any, AsyncGenerator, AsyncIterator


class IncrementalDecoder:
    """The text of a growing token list, decoding only a short window of recent tokens per new token.

    Two decodes share a start (`prefix`): the tokens already read, and those plus the new ones; the new text is
    the difference. Decoding both from the same start keeps word-boundary rules (leading spaces) consistent, and
    a window ending in a partial UTF-8 character (U+FFFD) waits for the next token. Decoding the whole list per
    token instead costs time quadratic in the output length (BENCHMARKS.md, "Detokenization").
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text has been emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """Add one token; returns the text it completes (may be empty)."""
        self.ids.append(token_id)
        if self.tokenizer is None:  # token ids only (a model folder without a tokenizer)
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta


class TextStream:
    """Turns an engine's token events into (text delta, finish reason) pairs, cutting at stop strings."""

    def __init__(self, events: AsyncGenerator[Any, str | None], tokenizer: Any, stop: list[str]) -> None:
        self.events = events
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.sent = 0  # characters of decoder.text already handed out
        self.num_tokens = 0
        self.error: str | None = None
        self.logprobs: list[tuple[int, Any]] = []  # (token id, (logprob, top-n)) when the request asked
        self.cached_tokens = 0  # prompt tokens the prefix cache served (told on the first token)

    @property
    def ids(self) -> list[int]:
        """Token ids generated so far."""
        return self.decoder.ids

    def __aiter__(self) -> AsyncIterator[tuple[str, str | None]]:
        return self._run()

    async def _run(self) -> AsyncIterator[tuple[str, str | None]]:
        """Yield text deltas; hold back text that may be the start of a stop string."""
        try:
            async for ev in self.events:
                if ev.error is not None:
                    self.error = ev.error
                    yield "", "error"
                    return
                self.num_tokens += 1
                if ev.cached_tokens is not None:
                    self.cached_tokens = ev.cached_tokens
                start = len(self.decoder.text)
                if ev.token_id is not None:
                    self.decoder.step(ev.token_id)
                    if ev.logprobs is not None:
                        self.logprobs.append((ev.token_id, ev.logprobs))
                text = self.decoder.text
                cut = self._find_stop(text, start)
                if cut >= 0:
                    await self._finish("stop")
                    yield text[self.sent:cut], "stop"
                    return
                if ev.finish_reason is not None:
                    yield text[self.sent:], ev.finish_reason
                    return
                safe = len(text) - self._held(text)
                if safe > self.sent:
                    delta, self.sent = text[self.sent:safe], safe
                    yield delta, None
        finally:
            await self.events.aclose()

    async def _finish(self, reason: str) -> None:
        """Tell the engine the request ended normally here (not an abort: it counts as finished)."""
        try:
            await self.events.asend(reason)
        except StopAsyncIteration:
            pass

    def _find_stop(self, text: str, new_from: int) -> int:
        """Where the first stop string begins, searching only where new text can complete one; -1 if none."""
        lo = max(0, new_from - self.longest_stop + 1)
        hits = [i for i in (text.find(s, lo) for s in self.stop) if i >= 0]
        return min(hits, default=-1)

    def _held(self, text: str) -> int:
        """How many trailing characters may be the start of a stop string."""
        return max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
