"""Continuous-batching scheduler: admit, step, retire and (when blocks run out) preempt sequences."""
from __future__ import annotations

from bisect import insort

from actors.shard.runner import NO_TOKEN, StepInput, StepOutput
from cluster.blocks import BlockManager
from cluster.request import RequestError
from cluster.sequence import Sequence
from cluster.speculative import Drafter, SpeculativeConfig, propose
from cluster.step_layout import lay_out
from cluster.structured import GrammarMatchers

__all__ = ["Scheduler", "Sequence"]  # Sequence is imported from here too


class Scheduler:
    """Decides which sequences run in each step: decodes first, prompt chunks in the rest of the token budget."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, grammars: GrammarMatchers | None = None,
                 speculative: SpeculativeConfig | None = None, drafter: Drafter | None = None) -> None:
        self.blocks = blocks
        self.grammars = grammars
        self.speculative = speculative
        self.drafter = drafter  # proposes drafts with a model (None: n-gram lookup)
        self.draft_tokens = 0  # drafts proposed and verified so far (vLLM's spec_decode_num_draft_tokens)
        self.accepted_tokens = 0  # of those, kept
        self.lookahead = False  # async scheduling: decodes join the next step before their current one answers
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []  # in rank order
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0  # admitted tokens whose KV came from the prefix cache
        self.admitted_tokens = 0  # all tokens of admitted sequences (hit rate = the ratio)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (checked by `GenerationParams.check`) and start its grammar matcher."""
        if seq.grammar is not None:
            if self.grammars is None:
                raise RequestError("this engine has no tokenizer for structured outputs; send free-text requests",
                                   "response_format")
            try:
                self.grammars.start(seq.seq_id, seq.grammar)
                for token in seq.output_ids:  # a resumed sequence: its matcher catches up with what it generated
                    self.grammars.accept(seq.seq_id, token)
            except ValueError as exc:
                raise RequestError(f"the output constraint cannot be enforced with this model's tokenizer: {exc}",
                                   "response_format") from None
        insort(self.waiting, seq, key=lambda s: s.rank)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self, max_seqs: int | None = None, max_prompt_tokens: int | None = None) -> list[Sequence]:
        """The next step, one mixed batch: a token for each ready decoding sequence (at most `max_seqs`), then
        prompt chunks of partly prefilled and newly admitted sequences in what is left of the token budget (and
        at most `max_prompt_tokens` of them).

        Decodes ride along with prefills instead of waiting behind them, and a long prompt is prefilled over
        several steps (chunked prefill). Sequences already in an unanswered step are skipped, so with pipeline
        parallelism several steps (micro-batches over disjoint sequences) can be in flight at once.
        """
        ready = [s for s in self.running if not s.in_flight]
        decodes = [s for s in ready if s.remaining == 1] + self._followers()
        prefills = [s for s in ready if s.remaining > 1]
        decodes = decodes[:min(max_seqs or len(decodes), self.max_num_batched_tokens)]
        self._draft(decodes)
        grown = self._grow(decodes + prefills)
        batch = [seq for seq in grown if seq.remaining == 1]
        for seq in batch:
            seq.chunk = 1 + len(seq.drafts)
        budget = self.max_num_batched_tokens - sum(seq.chunk for seq in batch)
        if max_prompt_tokens is not None:
            budget = min(budget, max_prompt_tokens)
        for seq in grown[len(batch):]:
            seq.chunk = min(seq.remaining, budget)
            budget -= seq.chunk
            if seq.chunk:
                batch.append(seq)
        batch += self._admit(budget)
        for seq in batch:
            seq.ahead, seq.in_flight = seq.in_flight, True  # already in a step: this one follows it
        return batch

    def _followers(self) -> list[Sequence]:
        """With async scheduling: decoding sequences whose unanswered step samples exactly one token that can be
        fed on unseen (no drafts; no grammar or penalties, which read each token first; not at their limits).
        None that a waiting sequence outranks, and none while blocks are short: only a sequence out of every step
        can be preempted, so those must fall idle when their step lands."""
        if not self.lookahead or self.blocks.num_available < len(self.running):
            return []
        head = self.waiting[0].rank if self.waiting else None
        return [s for s in self.running if s.in_flight and not s.ahead and s.remaining == 1 and s.chunk == 1
                and not s.drafts and not s.pool and s.grammar is None and not s.params.needs_history
                and s.finish_reason is None and len(s.output_ids) + 1 < s.max_tokens
                and len(s.tokens) + 1 < self.max_model_len and (head is None or head > s.rank)]

    def _draft(self, decodes: list[Sequence]) -> None:
        """Give each decoding sequence that speculation can serve exactly its drafts, n-gram or the draft model's
        (none for the rest): grammars, penalties, logit bias and logprobs read each token before the next, so they
        go one at a time."""
        spec = self.speculative
        wanted: list[tuple[Sequence, int]] = []
        for seq in decodes:
            seq.drafts = []
            p = seq.params
            if spec is None or seq.grammar is not None or p.needs_history or p.logit_bias or p.logprobs is not None:
                continue
            room = min(spec.num_speculative_tokens, seq.max_tokens - len(seq.output_ids) - 1,
                       self.max_model_len - len(seq.tokens) - 1)
            if room > 0 and self.drafter is None:
                seq.drafts = propose(seq.tokens, room, spec.prompt_lookup_min, spec.prompt_lookup_max)
            elif room > 0:
                wanted.append((seq, room))
        if wanted and self.drafter is not None:  # one batched round of the draft model
            proposed = self.drafter.propose([s for s, _ in wanted], [r for _, r in wanted], self.running)
            for (seq, _), drafts in zip(wanted, proposed):
                seq.drafts = drafts

    def pending_prompt_tokens(self) -> int:
        """Tokens still to prefill (or recompute) over the sequences not in a step now, waiting ones included."""
        return sum(s.remaining for s in self.running if not s.in_flight and s.remaining > 1) + \
            sum(s.remaining for s in self.waiting)

    def _grow(self, ready: list[Sequence]) -> list[Sequence]:
        """Give each ready sequence room for its next token, preempting the newest idle ones if blocks run out."""
        scheduled: list[Sequence] = []
        for seq in ready:
            need = len(seq.tokens) + len(seq.drafts) + seq.in_flight  # a follower writes one slot past its tokens
            while seq in self.running and not self.blocks.can_grow(seq.block_table, need):
                victims = sorted((v for v in self.running if not v.in_flight and v not in scheduled),
                                 key=lambda v: v.rank, reverse=True)  # lowest priority, newest first
                if not victims:
                    break  # everything else is mid-step; retry once those steps return
                self._preempt(victims[0])
            if seq in self.running and self.blocks.can_grow(seq.block_table, need):
                self.blocks.grow(seq.block_table, need)
                scheduled.append(seq)
            else:
                seq.drafts = []
        return scheduled

    def _admit(self, budget: int) -> list[Sequence]:
        """Move waiting sequences into the running batch while seats, token budget and blocks allow; each gets
        the blocks of its whole prompt now and the first chunk of it that fits the budget."""
        batch: list[Sequence] = []
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) >= self.max_num_seqs and not self._seat_for(seq):
                break
            if not seq.block_table:
                self._reuse_prefix(seq)
            if not self.blocks.can_grow(seq.block_table, len(seq.tokens)):
                if self._seat_for(seq):
                    continue  # a lower-priority sequence gave its blocks back: try again
                self._forget(seq)  # a waiting sequence pins no blocks: the head must always fit eventually
                break
            self.waiting.pop(0)
            self.prefix_hit_tokens += seq.num_cached
            if seq.cached_prompt_tokens is None:  # what the client is told (usage.prompt_tokens_details)
                seq.cached_prompt_tokens = seq.num_cached
            self.admitted_tokens += len(seq.tokens)
            self.blocks.grow(seq.block_table, len(seq.tokens))
            seq.chunk = min(seq.remaining, budget)
            budget -= seq.chunk
            self.running.append(seq)
            batch.append(seq)
        return batch

    def _seat_for(self, seq: Sequence) -> bool:
        """Free a seat for `seq` by preempting an idle running sequence of lower priority, if there is one."""
        idle = [v for v in self.running if not v.in_flight and v.priority > seq.priority]
        if not idle:
            return False
        self._preempt(max(idle, key=lambda v: v.rank))
        return True

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start a sequence on the cached blocks of its longest known prefix; only the rest is prefilled."""
        seq.block_table, seq.hash_parent = self.blocks.match_prefix(seq.tokens, seq.lora_root)
        seq.hashed_blocks = len(seq.block_table)
        seq.num_cached = seq.hashed_blocks * self.blocks.block_size

    def _forget(self, seq: Sequence) -> None:
        """Release a sequence's blocks; its tokens will be recomputed (or found in the prefix cache) later."""
        self.blocks.release(seq.block_table)
        seq.num_cached = seq.hashed_blocks = 0
        seq.hash_parent = seq.lora_root

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and requeue it first; its tokens are recomputed later."""
        self.running.remove(seq)
        self._forget(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        insort(self.waiting, seq, key=lambda s: s.rank)  # ahead of everything that arrived after it

    def build_step(self, seqs: list[Sequence]) -> StepInput:
        """Lay each scheduled sequence's chunk of uncached tokens end to end for the workers."""
        return lay_out(seqs, self.grammars)

    def update(self, seqs: list[Sequence], out: StepOutput) -> list[Sequence]:
        """Advance each sequence by its chunk, append the tokens sampled at prompt ends and decodes (and the drafts
        the grid kept), apply stop rules, retire finished sequences; returns the finished."""
        done: list[Sequence] = []
        for i, (seq, token) in enumerate(zip(seqs, out.token_ids)):
            seq.in_flight, seq.ahead, seq.new_tokens = seq.ahead, False, 0  # a follower's step is still out
            drafted, seq.drafts = len(seq.drafts), []
            if seq.finish_reason is not None:  # ended while its step ran: its blocks go once no step writes them
                if not seq.in_flight:
                    self.blocks.release(seq.block_table)
                continue
            seq.num_cached += seq.chunk - drafted  # a rejected draft's slot holds nothing: it is overwritten later
            if seq.remaining:  # a prompt chunk short of the end: nothing was sampled for it
                self._register(seq)
                continue
            if seq.pool:
                assert out.hidden is not None and i in out.hidden, f"sequence {seq.seq_id} was not pooled"
                self._register(seq)
                seq.hidden = out.hidden[i]
                seq.finish("stop")
                done.append(seq)
                continue
            assert token != NO_TOKEN, f"sequence {seq.seq_id} finished its chunk but the grid sampled no token"
            kept = (out.accepted or {}).get(i, []) if drafted else []
            self.draft_tokens += drafted
            self.accepted_tokens += len(kept)
            for n, new in enumerate([*kept, token]):
                self._append(seq, new, cached=n < len(kept))
                if seq.finish_reason is not None:
                    done.append(seq)
                    break
            self._register(seq)
        for seq in done:
            self.retire(seq)
        return done

    def _append(self, seq: Sequence, token: int, cached: bool) -> None:
        """One generated token: output, grammar, stop and length rules (`cached`: its K/V is already computed)."""
        seq.output_ids.append(token)
        seq.new_tokens += 1
        seq.num_cached += cached
        if seq.grammar is not None and self.grammars is not None:
            self.grammars.accept(seq.seq_id, token)
        if token in seq.stop_ids:
            seq.finish("stop")
        elif len(seq.output_ids) >= seq.max_tokens or len(seq.tokens) >= self.max_model_len:
            seq.finish("length")

    def _register(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed full blocks to the prefix cache."""
        if seq.num_cached // self.blocks.block_size > seq.hashed_blocks:
            seq.hashed_blocks, seq.hash_parent = self.blocks.register(
                seq.block_table, seq.tokens, seq.num_cached, seq.hashed_blocks, seq.hash_parent)

    def retire(self, seq: Sequence) -> None:
        """Drop a sequence from the batch (finished or aborted); blocks of a mid-step one are freed by update()."""
        if seq.grammar is not None and self.grammars is not None:
            self.grammars.release(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.in_flight:
            self.blocks.release(seq.block_table)
