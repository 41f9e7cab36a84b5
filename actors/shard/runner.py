"""Everything one worker does per step, without Ray: build its shard, load it, run a step."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.shard import quant
from actors.shard.checkpoint import open_checkpoint
from actors.shard.cpu_gemm import CpuWeights, packed_bytes
from actors.shard.kv_cache import AttnMeta, PagedKVCache, prefault
from actors.shard.loader import load_stage
from actors.shard.lora import StageLora
from actors.shard.lora_files import Adapter, read_adapter
from actors.shard.matmul_plan import plan_linears
from actors.shard.model import StageModel
from actors.shard.partition import Partition, even_partition
from actors.shard.sampler import Logprobs, Sampler, SamplingParams, unpack_bitmask
from actors.shard.spec import HeadSplit
from actors.shard.tp import TPGroup

NO_TOKEN = -1  # StepOutput.token_ids entry of a sequence that sampled nothing (its prompt chunk ends short)


@dataclass
class StepInput:
    """One engine step for every stage: sequences laid end to end, cache addressed by block tables."""

    token_ids: np.ndarray  # [T] int64, the new tokens of all sequences, concatenated
    positions: np.ndarray  # [T] int64, each token's position in its sequence
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens per sequence once this step is done
    block_tables: list[list[int]]  # cache blocks per sequence
    sampling: list[SamplingParams]  # per sequence, used by the last stage
    output_index: list[int]  # tokens already generated per sequence (feeds seeded sampling)
    return_logits: bool = False  # also send back the last-position logits (tests, debugging)
    histories: list[tuple[list[int], list[int]] | None] | None = None  # (prompt, output) where penalties apply
    # Structured outputs: (rows, int32 bitmask [len(rows), ceil(V/32)]) of the sampled rows whose next token is
    # constrained (bit j of word w = token 32w+j allowed), made by the scheduler's grammar matchers.
    allowed: tuple[list[int], np.ndarray] | None = None
    sample: list[bool] | None = None  # per sequence: does its chunk end its known tokens (None: all do)
    pool: list[bool] | None = None  # per sequence: answer its last token's final hidden state, not a token
    drafts: list[int] | None = None  # per sequence: speculative draft tokens ending its chunk, to verify (None: 0)
    lora: list[int | None] | None = None  # per sequence: its LoRA adapter's slot (None: the base model)
    # Async scheduling: per sequence, the row of the previous step whose sampled token is its one new token (sent
    # before that step answered, so its id is unknown to the driver), or -1 where the token is given.
    follow: list[int] | None = None

    def num_drafts(self, row: int) -> int:
        """How many of sequence `row`'s new tokens are drafts to verify."""
        return self.drafts[row] if self.drafts is not None else 0

    def pooled(self, row: int) -> bool:
        """Whether sequence `row` asks for its hidden state (an embedding request) instead of a sampled token."""
        return self.pool is not None and self.pool[row]

    def sampled_rows(self) -> list[int]:
        """Indices of the sequences that sample a token in this step."""
        if self.sample is None:
            return list(range(len(self.query_lens)))
        return [i for i, go in enumerate(self.sample) if go]


@dataclass
class StepOutput:
    """What travels back to the driver from the last stage: token ids, never activations."""

    token_ids: list[int]
    logits: np.ndarray | None = None
    logprobs: list[Logprobs | None] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    hidden: dict[int, np.ndarray] | None = None  # pooled rows: final-norm hidden state [hidden] of the last token
    accepted: dict[int, list[int]] | None = None  # rows with drafts: the drafts kept, emitted before token_ids[row]


@dataclass(frozen=True)
class ShardPlan:
    """Where a worker sits in the grid and how its shard is built."""

    model_dir: str
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dtype: str | None = None  # None = the checkpoint's dtype
    max_model_len: int = 2048
    block_size: int = 16
    partition: Partition | None = None  # decoder layers per stage; None = an even split
    cpu_weights: CpuWeights = "auto"  # layout of large fp32 linear weights on CPU (see cpu_gemm)
    max_loras: int = 0  # LoRA adapter slots per layer (0: LoRA off)
    max_lora_rank: int = 16  # rank of each slot; lower-rank adapters are zero-padded

    def layer_counts(self, num_layers: int) -> Partition:
        """Decoder layers per stage for a model of `num_layers` layers."""
        return self.partition or even_partition(num_layers, self.pp_size)


def to_wire(x: torch.Tensor) -> np.ndarray:
    """A tensor as numpy for the object store (bfloat16 travels as its int16 bit pattern)."""
    x = x.detach().cpu()
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Inverse of `to_wire`; reads the (possibly read-only, shared) buffer without copying on CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write into it
        t = torch.from_numpy(a)
    t = t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
    return t.to(device)


class StageRunner:
    """One (pp_rank, tp_rank) shard: model weights, KV cache and the per-step forward."""

    def __init__(self, plan: ShardPlan, tp: TPGroup, device: torch.device) -> None:
        self.plan = plan
        self.tp = tp
        self.device = device
        start = time.perf_counter()
        reader = open_checkpoint(plan.model_dir)  # a GGUF file is parsed once: spec and tensors
        self.spec = reader.spec()
        self.dtype = self.spec.torch_dtype(plan.dtype)
        layers = plan.layer_counts(self.spec.num_layers)
        with torch.device(device):
            self.model = StageModel(self.spec, tp, plan.pp_rank, layers, self.dtype, plan.max_model_len, device)
        load_stage(self.model, reader.keys(), reader.get_slice, self.spec)
        # The GGUF blocks of every linear read whole from them, for plan_linears (CPU only: CUDA drops them).
        quant.finalize(self.model, use=device.type == "cpu")
        self.matmul_plans = plan_linears(self.model, plan.cpu_weights) if device.type == "cpu" else {}
        self.lora = StageLora(self.model.model.layers, plan.max_loras, plan.max_lora_rank) \
            if plan.max_loras else None
        self.lora_pending: dict[int, Adapter | None] = {}  # slot -> adapter to load (None: to empty) next step
        self.load_seconds = time.perf_counter() - start
        self.split = HeadSplit.of(self.spec, tp.rank, tp.size)
        self.cache: PagedKVCache | None = None
        self.sampler = Sampler()
        self.last_sampled: list[int] = []  # the last step's token per row (what a following step's rows read)
        self.last_rows = 0  # rows of the last step (every rank knows it; only rank 0 sampled them)
        self.is_first, self.is_last = plan.pp_rank == 0, plan.pp_rank == plan.pp_size - 1

    def _allowed(self, step: StepInput, rows: list[int]) -> tuple[list[int], torch.Tensor] | None:
        """The step's grammar bitmasks as (positions among the sampled rows, bool [G, V]) for the sampler."""
        if step.allowed is None:
            return None
        mask_rows, bits = step.allowed
        where = {row: k for k, row in enumerate(rows)}
        return [where[r] for r in mask_rows], unpack_bitmask(torch.from_numpy(bits), self.spec.vocab_size)

    def weight_bytes(self) -> int:
        """Bytes of parameters this shard holds (shared tensors counted once), packed and GGUF-block CPU copies and
        LoRA slots included."""
        lora = self.lora.nbytes() if self.lora is not None else 0
        copies = packed_bytes(self.model) + quant.quant_bytes(self.model)
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) + copies + lora

    def load_lora(self, slot: int, name: str, path: str) -> None:
        """Read and check a PEFT adapter for `slot` (ValueError naming it if bad; the slot is then as before). The
        copy into the slot happens at the start of the next step, on the step thread: a torch op on another
        thread would start a second OpenMP pool, which slows every later CPU step (see cluster/grid.py)."""
        if self.lora is None:
            raise ValueError(f"LoRA adapter {name!r}: this server runs without LoRA; set enable_lora: true")
        adapter = read_adapter(name, path, self.spec, self.lora.max_rank)
        self.lora.check(slot, adapter)
        self.lora_pending[slot] = adapter  # no step uses `slot` until the caller hears back

    def unload_lora(self, slot: int) -> None:
        """Empty adapter slot `slot` (at the start of the next step)."""
        if self.lora is not None:
            self.lora.check_slot(slot)
            self.lora_pending[slot] = None

    def _apply_lora(self) -> None:
        """Carry out the adapter loads and unloads asked for since the last step."""
        assert self.lora is not None
        while self.lora_pending:
            slot, adapter = self.lora_pending.popitem()
            if adapter is None:
                self.lora.unload(slot)
            else:
                self.lora.load(slot, adapter)

    def block_bytes(self) -> int:
        """Bytes one KV block costs on this worker."""
        return PagedKVCache.bytes_per_block(len(self.model.model.layer_ids), self.plan.block_size,
                                            self.split.num_kv_heads, self.spec.head_dim, self.dtype)

    def allocate_cache(self, num_blocks: int, prefault_blocks: int = 0) -> float | None:
        """Allocate this worker's share of `num_blocks` KV blocks; on CPU fault the first `prefault_blocks` in.

        Returns the seconds that took, or None where nothing was faulted in (nothing asked, CUDA, an old kernel).
        """
        self.cache = PagedKVCache(len(self.model.model.layer_ids), num_blocks, self.plan.block_size,
                                  self.split.num_kv_heads, self.spec.head_dim, self.dtype, self.device)
        if self.device.type != "cpu" or prefault_blocks <= 0:
            return None
        start = time.perf_counter()
        done = prefault(self.cache, min(num_blocks, prefault_blocks), torch.get_num_threads())
        return time.perf_counter() - start if done else None

    @torch.inference_mode()
    def execute(self, step: StepInput, hidden: np.ndarray | None = None) -> np.ndarray | StepOutput | None:
        """Run this stage on one step: hidden states out (inner stage) or sampled tokens (last stage)."""
        assert self.cache is not None, "allocate_cache() must run before execute()"
        start = time.perf_counter()
        comm_before = self.tp.comm_seconds
        if self.is_first:
            ids = step.token_ids if step.follow is None else self._followed(step)
            inputs = torch.tensor(ids, device=self.device)  # small: copy, never alias the store
        else:
            assert hidden is not None, f"stage {self.plan.pp_rank} needs the previous stage's hidden states"
            inputs = from_wire(hidden, self.dtype, self.device)  # [T, hidden]
        rows = step.sampled_rows()
        meta = AttnMeta.build(step.query_lens, step.context_lens, step.block_tables, self.plan.block_size,
                              self.spec.sliding_window, self.device)
        positions = torch.tensor(step.positions, device=self.device)
        if self.lora is not None:
            self._apply_lora()
            self.lora.batch.set(step.lora, step.query_lens, self.device, self.dtype)
        out = self.model(inputs, positions, self.cache, meta)  # [T, hidden]
        self.last_rows = len(step.query_lens)
        if not self.is_last:
            return to_wire(out)
        ends = np.cumsum(step.query_lens) - 1  # each sequence's last token in `out`
        pooled = {row: out[int(ends[row])] for row in rows if step.pooled(row)}
        rows = [row for row in rows if not step.pooled(row)]
        if not rows:  # every sequence is mid-prompt or pooled: no logits, nothing to sample (the same on every rank)
            self.last_sampled = [NO_TOKEN] * len(step.query_lens)
            return StepOutput([NO_TOKEN] * len(step.query_lens), hidden=self._pooled(pooled)) \
                if self.tp.rank == 0 else None
        # Rows with drafts read logits at each draft's position too (the one before it predicts it).
        firsts = [int(ends[r]) - step.num_drafts(r) for r in rows]
        picks = [i for r, f in zip(rows, firsts) for i in range(f, int(ends[r]) + 1)]
        logits = self.model.logits(out[torch.tensor(picks, device=self.device)])  # [picks, vocab], every rank
        if self.tp.rank != 0:
            return None  # only TP rank 0 samples and answers
        at = np.cumsum([0] + [step.num_drafts(r) + 1 for r in rows])  # each row's first pick in `logits`
        plain = [k for k, r in enumerate(rows) if not step.num_drafts(r)]
        all_tokens: list[int] = [NO_TOKEN] * len(step.query_lens)
        all_logprobs: list[Logprobs | None] = [None] * len(step.query_lens)
        accepted: dict[int, list[int]] = {}
        if plain:
            plain_rows = [rows[k] for k in plain]
            histories: list[tuple[list[int], list[int]] | None] = (
                [step.histories[i] for i in plain_rows] if step.histories else [None] * len(plain_rows))
            tokens, logprobs = self.sampler.sample(
                logits[torch.tensor(at[plain])], [step.sampling[i] for i in plain_rows],
                [step.output_index[i] for i in plain_rows], histories, self._allowed(step, plain_rows))
            for row, token, lp in zip(plain_rows, tokens, logprobs):
                all_tokens[row], all_logprobs[row] = token, lp
        for k, row in enumerate(rows):
            if (d := step.num_drafts(row)):
                drafts = [int(t) for t in step.token_ids[int(ends[row]) - d + 1:int(ends[row]) + 1]]
                accepted[row], all_tokens[row] = self.sampler.verify(logits[at[k]:at[k + 1]], drafts,
                                                                     step.sampling[row], step.output_index[row])
        self.last_sampled = all_tokens
        timings = {"step_s": time.perf_counter() - start, "comm_s": self.tp.comm_seconds - comm_before}
        return StepOutput(all_tokens, logits.cpu().numpy() if step.return_logits else None,
                          all_logprobs if any(lp is not None for lp in all_logprobs) else None, timings,
                          self._pooled(pooled), accepted or None)

    def _followed(self, step: StepInput) -> np.ndarray:
        """The step's token ids with each following row's new token taken from what the previous step sampled."""
        if not self.is_last:
            raise ValueError(f"StepInput.follow needs one stage (pp_size=1), not pp_size={self.plan.pp_size}: the "
                             "first stage never sees what the last one sampled; schedule these steps without it")
        assert step.follow is not None
        if self.tp.size > 1:  # only rank 0 sampled: one small all-reduce of its tokens (the others add zeros)
            mine = self.last_sampled if self.tp.rank == 0 else [0] * self.last_rows
            self.last_sampled = self.tp.all_reduce(torch.tensor(mine, dtype=torch.int64, device=self.device)).tolist()
        ids: np.ndarray = step.token_ids.copy()
        ends = np.cumsum(step.query_lens) - 1
        for row, prev in enumerate(step.follow):
            if prev >= 0:
                token = self.last_sampled[prev] if prev < len(self.last_sampled) else NO_TOKEN
                if token == NO_TOKEN:
                    raise RuntimeError(f"row {row} follows row {prev} of the previous step, which sampled nothing")
                ids[ends[row]] = token
        return ids

    @staticmethod
    def _pooled(pooled: dict[int, torch.Tensor]) -> dict[int, np.ndarray] | None:
        """Pooled hidden states as float32 numpy rows, or None when the step pooled nothing."""
        return {row: h.float().cpu().numpy() for row, h in pooled.items()} if pooled else None
