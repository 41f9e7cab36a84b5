"""Incremental detokenization with stop strings: token events in, text deltas out, O(1) decode work per token."""
from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from cluster.request import ChoiceDelta, Resume, TokenLogprob


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
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)  # the tokenizer is held as Any
        return text

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
    """One choice: an engine's token events in, `ChoiceDelta`s out, text cut at stop strings, logprobs decoded."""

    def __init__(self, events: AsyncGenerator[Any, str | None], tokenizer: Any, stop: list[str],
                 index: int = 0, resume: Resume | None = None) -> None:
        """`resume`: the tokens (and characters of their text) a lost replica already handed out for this choice;
        their text is decoded again here, and only what follows (held-back text included) goes out."""
        self.events = events
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = stop
        self.index = index
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.sent = 0  # characters of decoder.text already handed out
        if resume is not None:
            for token in resume.token_ids:  # token by token: the same text, spaces and all, as the first replica's
                self.decoder.step(token)
            self.sent = min(resume.text_chars, len(self.decoder.text))
        self.ids: list[int] = []  # token ids not yet handed out
        self.logprobs: list[TokenLogprob] = []  # their logprobs, when the request asked
        self.cached_tokens: int | None = None  # told on the first delta

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._run()

    def _delta(self, text: str, reason: str | None = None, error: str | None = None) -> ChoiceDelta:
        """A delta carrying every token since the last one."""
        delta = ChoiceDelta(self.index, text, self.ids, reason, self.logprobs, self.cached_tokens, error)
        self.ids, self.logprobs, self.cached_tokens = [], [], None
        return delta

    async def _run(self) -> AsyncIterator[ChoiceDelta]:
        """Yield deltas; hold back text that may be the start of a stop string."""
        try:
            async for ev in self.events:
                if ev.error is not None:
                    yield self._delta("", "error", ev.error)
                    return
                if ev.cached_tokens is not None:
                    self.cached_tokens = ev.cached_tokens
                start = len(self.decoder.text)
                if ev.token_id is not None:
                    self.decoder.step(ev.token_id)
                    self.ids.append(ev.token_id)
                    if ev.logprobs is not None:
                        self.logprobs.append(self._token_logprob(ev.token_id, ev.logprobs))
                text = self.decoder.text
                cut = self._find_stop(text, start)
                if cut >= 0:
                    await self._finish("stop")
                    yield self._delta(text[self.sent:cut], "stop")
                    return
                if ev.finish_reason is not None:
                    yield self._delta(text[self.sent:], ev.finish_reason)
                    return
                safe = len(text) - self._held(text)
                if safe > self.sent:
                    delta, self.sent = text[self.sent:safe], safe
                    yield self._delta(delta)
                elif self.ids:  # its text waits (a partial character, a stop string's start): sent empty, as
                    yield self._delta("")  # vLLM does, so clients see each token when the engine makes it
        finally:
            await self.events.aclose()

    def _token_logprob(self, token: int, logprobs: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
        """The sampler's (logprob, top-n ids) with every token as its text."""
        value, top = logprobs
        return TokenLogprob(self._piece(token), value, [(self._piece(i), v) for i, v in top])

    def _piece(self, token: int) -> str:
        """One token's text (`token_id:N` without a tokenizer, as vLLM spells ids)."""
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"token_id:{token}"

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
