"""Everything one worker does per step, without Ray: build its shard, load it, run a step."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.shard.kv_cache import AttnMeta, PagedKVCache
from actors.shard.loader import CheckpointReader, load_stage
from actors.shard.model import StageModel
from actors.shard.partition import Partition, even_partition
from actors.shard.sampler import Logprobs, Sampler, SamplingParams
from actors.shard.spec import HeadSplit, ModelSpec
from actors.shard.tp import TPGroup


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


@dataclass
class StepOutput:
    """What travels back to the driver from the last stage: token ids, never activations."""

    token_ids: list[int]
    logits: np.ndarray | None = None
    logprobs: list[Logprobs | None] | None = None
    timings: dict[str, float] = field(default_factory=dict)


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
        self.spec = ModelSpec.from_dir(plan.model_dir)
        self.dtype = self.spec.torch_dtype(plan.dtype)
        start = time.perf_counter()
        layers = plan.layer_counts(self.spec.num_layers)
        with torch.device(device):
            self.model = StageModel(self.spec, tp, plan.pp_rank, layers, self.dtype, plan.max_model_len, device)
        reader = CheckpointReader(plan.model_dir)
        load_stage(self.model, reader.keys(), reader.get_slice, self.spec)
        self.load_seconds = time.perf_counter() - start
        self.split = HeadSplit.of(self.spec, tp.rank, tp.size)
        self.cache: PagedKVCache | None = None
        self.sampler = Sampler()
        self.is_first, self.is_last = plan.pp_rank == 0, plan.pp_rank == plan.pp_size - 1

    def weight_bytes(self) -> int:
        """Bytes of parameters this shard holds (shared tensors counted once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def block_bytes(self) -> int:
        """Bytes one KV block costs on this worker."""
        return PagedKVCache.bytes_per_block(len(self.model.model.layer_ids), self.plan.block_size,
                                            self.split.num_kv_heads, self.spec.head_dim, self.dtype)

    def allocate_cache(self, num_blocks: int) -> None:
        """Allocate this worker's share of `num_blocks` KV blocks."""
        self.cache = PagedKVCache(len(self.model.model.layer_ids), num_blocks, self.plan.block_size,
                                  self.split.num_kv_heads, self.spec.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def execute(self, step: StepInput, hidden: np.ndarray | None = None) -> np.ndarray | StepOutput | None:
        """Run this stage on one step: hidden states out (inner stage) or sampled tokens (last stage)."""
        assert self.cache is not None, "allocate_cache() must run before execute()"
        start = time.perf_counter()
        comm_before = self.tp.comm_seconds
        if self.is_first:
            inputs = torch.tensor(step.token_ids, device=self.device)  # small: copy, never alias the store
        else:
            assert hidden is not None, f"stage {self.plan.pp_rank} needs the previous stage's hidden states"
            inputs = from_wire(hidden, self.dtype, self.device)  # [T, hidden]
        meta = AttnMeta.build(step.query_lens, step.context_lens, step.block_tables, self.plan.block_size,
                              self.spec.sliding_window, self.device)
        positions = torch.tensor(step.positions, device=self.device)
        out = self.model(inputs, positions, self.cache, meta)  # [T, hidden]
        if not self.is_last:
            return to_wire(out)
        last = torch.tensor(np.cumsum(step.query_lens) - 1, device=self.device)
        logits = self.model.logits(out[last])  # [B, vocab] on every TP rank
        if self.tp.rank != 0:
            return None  # only TP rank 0 samples and answers
        histories = step.histories or [None] * len(step.sampling)
        tokens, logprobs = self.sampler.sample(logits, step.sampling, step.output_index, histories)
        timings = {"step_s": time.perf_counter() - start, "comm_s": self.tp.comm_seconds - comm_before}
        return StepOutput(tokens, logits.cpu().numpy() if step.return_logits else None,
                          logprobs if any(lp is not None for lp in logprobs) else None, timings)
