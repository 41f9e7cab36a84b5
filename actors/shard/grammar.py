"""Structured outputs on the sampling rank: per-sequence grammar matchers (llguidance) and batched token masks.

A sequence's grammar travels in each step as a small `GrammarSpec`; its matcher lives here, keyed by the
sequence id, and advances by the token this rank sampled. KV-cache preemption and pipeline micro-batching
never touch it: a recomputed sequence resumes with the same matcher, and `output_index` checks that the
matcher has consumed exactly the tokens the driver holds.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import llguidance
import llguidance.numpy  # not llguidance.torch: that one imports torch's compiler (~3.4 s per process)
import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
# Compact JSON like json.dumps: a random or weak model cannot pad the output with unbounded whitespace.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


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


@dataclass(frozen=True)
class GrammarRef:
    """A sequence's grammar as a step carries it."""

    seq_id: int
    spec: GrammarSpec


@dataclass
class _Live:
    """One sequence's matcher and how many of its tokens it has consumed."""

    matcher: llguidance.LLMatcher | None  # None: the grammar failed to compile, the sequence can only stop
    consumed: int = 0


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [G, ceil(V/32)] (bit j of word w = token 32w+j allowed) -> bool [G, V]."""
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = (bits.unsqueeze(-1) >> shifts) & 1  # [G, W, 32]
    return allowed.view(bits.shape[0], -1)[:, :vocab_size].bool()


class GrammarBank:
    """Compiled grammars (compiled once per spec, LRU) and the live matchers of this rank's sequences."""

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int, eos_ids: tuple[int, ...],
                 cache_size: int = 128, threads: int = 2) -> None:
        self.load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self.cache_size = cache_size
        self.compiled: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self.live: dict[int, _Live] = {}
        self.compiles = 0
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~1 s for a large vocab)
        self._executor: llguidance.LLExecutor | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar")  # masks overlap the forward pass

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the model's tokenizer, with the model's stop tokens as EOS."""
        if self._tokenizer is None:
            hf = self.load_tokenizer()
            if hf is None:
                raise ValueError("structured outputs need the model's tokenizer; this model folder has none")
            import llguidance.hf  # late: it imports transformers (~1.3 s), which most workers never need

            self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_ids or None)
            self._executor = llguidance.LLExecutor(num_threads=max(1, torch.get_num_threads()))
        return self._tokenizer

    def _template(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """The compiled, untouched matcher of `spec`; new sequences start from a copy of it."""
        template = self.compiled.get(spec)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, spec.grammar(), log_level=0)
            if template.is_error():
                raise ValueError(f"grammar does not compile: {template.get_error()}")
            self.compiles += 1
            self.compiled[spec] = template
            if len(self.compiled) > self.cache_size:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(spec)
        return template

    def _matcher(self, ref: GrammarRef, output_index: int) -> _Live:
        """The live matcher of a sequence, created on its first step; checks it is in step with the driver."""
        live = self.live.get(ref.seq_id)
        if live is None or output_index == 0:  # at index 0 a fresh matcher is right, whatever was left here
            try:
                matcher: llguidance.LLMatcher | None = self._template(ref.spec).deep_copy()
            except ValueError:  # the API checks grammars first; never fail the whole step for one sequence
                matcher = None
            live = self.live[ref.seq_id] = _Live(matcher)
        if live.consumed != output_index:
            raise RuntimeError(f"grammar state of sequence {ref.seq_id} has consumed {live.consumed} tokens but "
                               f"the sequence has {output_index}; the sampling rank lost its state")
        return live

    def release(self, seq_ids: list[int]) -> None:
        """Forget the matchers of finished or aborted sequences."""
        for sid in seq_ids:
            self.live.pop(sid, None)

    def start_masks(self, refs: list[GrammarRef | None], output_index: list[int]) -> Future:
        """Compute the allowed-token masks of the grammar rows in a thread; result: (rows, bool [G, V]) or None."""
        rows = [i for i, r in enumerate(refs) if r is not None]
        if not rows:
            done: Future = Future()
            done.set_result(None)
            return done
        lives = [self._matcher(refs[i], output_index[i]) for i in rows]  # compile here: errors surface now
        return self._thread.submit(self._masks, rows, lives)

    def _masks(self, rows: list[int], lives: list[_Live]) -> tuple[list[int], torch.Tensor]:
        """Fill every grammar row's bitmask at once (llguidance's thread pool), then unpack it."""
        bits = llguidance.numpy.allocate_token_bitmask(len(rows), self.vocab_size)  # int32 [G, ceil(V/32)]
        pairs = [(lv.matcher, g) for g, lv in enumerate(lives) if lv.matcher is not None]
        if pairs:
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, pairs, bits)
        allowed = unpack_bitmask(torch.from_numpy(bits), self.vocab_size)
        for g, lv in enumerate(lives):
            if lv.matcher is None or lv.matcher.is_error() or lv.matcher.is_stopped() or not allowed[g].any():
                # Finished (or broken) grammar: only a stop token may follow, so the sequence ends here.
                allowed[g] = not self.eos_ids  # no stop token known: leave the row free rather than empty
                allowed[g, self.eos_ids] = True
        return rows, allowed

    def accept(self, refs: list[GrammarRef | None], tokens: list[int]) -> None:
        """Advance each grammar row's matcher by the token sampled for it."""
        for ref, tok in zip(refs, tokens):
            if ref is None:
                continue
            live = self.live[ref.seq_id]
            if live.matcher is not None and not live.matcher.is_stopped():
                live.matcher.consume_token(tok)
            live.consumed += 1

    def close(self) -> None:
        """Stop the mask thread."""
        self._thread.shutdown(wait=False)
