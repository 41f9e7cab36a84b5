"""Incremental detokenization with stop strings: token events in, text deltas out."""
from __future__ import annotations

from typing import Any, AsyncIterator


class TextStream:
    """Turns an engine's token events into (text delta, finish reason) pairs, cutting at stop strings."""

    def __init__(self, events: AsyncIterator[Any], tokenizer: Any, stop: list[str]) -> None:
        self.events = events
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.num_tokens = 0
        self.error: str | None = None
        self.logprobs: list[tuple[int, Any]] = []  # (token id, (logprob, top-n)) when the request asked

    def __aiter__(self) -> AsyncIterator[tuple[str, str | None]]:
        return self._run()

    async def _run(self) -> AsyncIterator[tuple[str, str | None]]:
        """Yield text deltas; hold back text that may be the start of a stop string or a split character."""
        try:
            async for ev in self.events:
                if ev.error is not None:
                    self.error = ev.error
                    yield "", "error"
                    return
                self.num_tokens += 1
                if ev.token_id is not None:
                    self.ids.append(ev.token_id)
                    if ev.logprobs is not None:
                        self.logprobs.append((ev.token_id, ev.logprobs))
                text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
                cut = min((text.find(s) for s in self.stop if s in text), default=-1)
                if cut >= 0:
                    yield text[len(self.sent):cut], "stop"
                    return
                if ev.finish_reason is not None:
                    yield text[len(self.sent):], ev.finish_reason
                    return
                safe = len(text) - self._held(text)
                if safe > len(self.sent):
                    delta, self.sent = text[len(self.sent):safe], text[:safe]
                    yield delta, None
        finally:
            await self.events.aclose()

    def _held(self, text: str) -> int:
        """How many trailing characters to hold: a partial UTF-8 character or a stop-string prefix."""
        if text.endswith("\ufffd"):
            return 1
        return max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
