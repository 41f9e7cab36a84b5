"""Structured outputs beside the scheduler: per-sequence grammar matchers (llguidance) and the token bitmasks a
step carries to the sampling rank.

As in vLLM v1, the matchers live where the scheduler is, not on a worker: a sequence's matcher starts when it is
queued, its allowed-token bitmask is computed when it is scheduled to sample, and it advances by the token the
grid returns. A sequence is in at most one step at a time (pipeline micro-batches are disjoint), so its matcher
has always consumed exactly the tokens the scheduler holds when its next mask is made; preemption keeps it.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.numpy  # not llguidance.torch: that one imports torch's compiler, seconds per process
import numpy as np

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # declared only in llguidance's stub

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
# Compact JSON like json.dumps: a random or weak model cannot pad the output with unbounded whitespace.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GrammarSpec:
    """What a sequence's output must match; hashable, so it keys the compiled-grammar cache."""

    kind: str  # one of KINDS
    text: str  # JSON schema (canonical JSON), regex, JSON list of choices, or a Lark grammar

    def grammar(self) -> str:
        """The llguidance grammar for this spec (raises ValueError on a malformed schema)."""
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(json.loads(self.text), defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.text)
        if self.kind == "choice":
            # JSON string literals are valid Lark literals, escapes included.
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in
                                                                                  json.loads(self.text)))
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.text)
        raise ValueError(f"unknown grammar kind {self.kind!r}; expected one of {KINDS}")

    def error(self) -> str | None:
        """Why this spec cannot be compiled (None if it can); needs no tokenizer, so the API checks it early."""
        try:
            err = llguidance.LLMatcher.validate_grammar(self.grammar())
        except (ValueError, TypeError, RuntimeError) as exc:
            return str(exc)
        return err or None


@dataclass
class _Live:
    """One sequence's matcher and how many of its tokens it has consumed."""

    matcher: llguidance.LLMatcher
    consumed: int = 0


class GrammarMatchers:
    """Compiled grammars (once per spec, LRU) and the live matcher of every constrained sequence of one engine."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...], cache_size: int = 128) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self.cache_size = cache_size
        self.compiled: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self.live: dict[int, _Live] = {}
        self.compiles = 0
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use: it reads the whole vocabulary
        self._executor: llguidance.LLExecutor | None = None

    @property
    def words(self) -> int:
        """int32 words per bitmask row."""
        return (self.vocab_size + 31) // 32

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the model's tokenizer, with the model's stop tokens as EOS."""
        if self._tokenizer is None:
            if self.hf_tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer; this model folder has none")
            import llguidance.hf  # late: it imports transformers, which a replica without grammars never needs

            self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_ids or None)
            self._executor = llguidance.LLExecutor(num_threads=2)
        return self._tokenizer

    def _template(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """The compiled, untouched matcher of `spec`; new sequences start from a copy of it."""
        template = self.compiled.get(spec)
        if template is None:
            template = llguidance.LLMatcher(self._llg_tokenizer(), spec.grammar(), log_level=0)
            if template.is_error():
                raise ValueError(f"grammar does not compile: {template.get_error()}")
            self.compiles += 1
            self.compiled[spec] = template
            if len(self.compiled) > self.cache_size:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(spec)
        return template

    def start(self, seq_id: int, spec: GrammarSpec) -> None:
        """Give a new sequence its own matcher (ValueError if the grammar does not compile for this tokenizer)."""
        self.live[seq_id] = _Live(self._template(spec).deep_copy())

    def release(self, seq_id: int) -> None:
        """Forget a finished or aborted sequence's matcher."""
        self.live.pop(seq_id, None)

    def masks(self, seq_ids: list[int], output_lens: list[int]) -> np.ndarray:
        """Allowed-token bitmasks, int32 [len(seq_ids), ceil(V/32)] (bit j of word w = token 32w+j allowed)."""
        lives = [self.live[s] for s in seq_ids]
        for sid, live, n in zip(seq_ids, lives, output_lens):
            if live.consumed != n:
                raise RuntimeError(f"grammar state of sequence {sid} has consumed {live.consumed} tokens but the "
                                   f"sequence has {n}; a token was lost between the grid and the scheduler")
        bits = llguidance.numpy.allocate_token_bitmask(len(lives), self.vocab_size)
        pairs = [(lv.matcher, g) for g, lv in enumerate(lives) if not lv.matcher.is_stopped()]
        if pairs:
            assert self._executor is not None, "matchers exist only after _llg_tokenizer() built the executor"
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, pairs, bits)
        for g, lv in enumerate(lives):
            if lv.matcher.is_error() or lv.matcher.is_stopped() or not bits[g].any():
                self._only_stop(bits[g])
        return bits

    def _only_stop(self, row: np.ndarray) -> None:
        """A finished (or broken) grammar: only a stop token may follow, so the sequence ends here."""
        if not self.eos_ids:  # no stop token known: leave the row free rather than empty
            row[:] = -1
            return
        row[:] = 0
        for eos in self.eos_ids:
            row[eos // 32] |= np.int32(np.uint32(1 << (eos % 32)).view(np.int32))

    def accept(self, seq_id: int, token: int) -> None:
        """Advance a sequence's matcher by the token sampled for it."""
        live = self.live[seq_id]
        if not live.matcher.is_stopped():
            live.matcher.consume_token(token)
        live.consumed += 1
