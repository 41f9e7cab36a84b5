"""Multi-LoRA on one shard: stacked low-rank A/B buffers per projection, one slot per resident adapter.

Every slot of a layer holds one adapter's A and B (rank padded with zeros to max_lora_rank, the scale folded into
B). A step names each sequence's slot (None = the base model); tokens are grouped by slot and each group adds
(x A^T) B^T to the base layer's output. Sharding follows the base layers: a column-parallel layer keeps its rows
of B (so the delta lands on this rank's output columns), a row-parallel layer keeps its columns of A and all of B
(so the delta is a partial sum that the layer's existing all-reduce completes).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from actors.shard.layers import ColumnParallelLinear, RowParallelLinear
from actors.shard.lora_files import TARGETS, Adapter

# Up to this many adapters in a step, every token runs all their A's in one matmul and a mask keeps its own: a
# few more flops, far fewer small ops than a gather-matmul-scatter per adapter (python -m bench.lora).
MASKED_MAX_ADAPTERS = 4


class LoraBatch:
    """The current step's adapters per token, shared by every LoRA layer of the stage: nothing (no adapter in the
    step), one slot for every token, a token-by-adapter mask over a few slots, or token groups per slot."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor | None]] = []  # (slot, token indices; None = every token)
        self.active: torch.Tensor | None = None  # the step's slots, when `mask` is used
        self.mask: torch.Tensor | None = None  # [T, len(active)]: 1 where token t uses active[j] (None: groups)

    def set(self, slots: Sequence[int | None] | None, query_lens: Sequence[int], device: torch.device,
            dtype: torch.dtype) -> None:
        """Expand per-sequence slots (None: the base model) to this step's per-token form."""
        self.groups, self.active, self.mask = [], None, None
        if slots is None or all(s is None for s in slots):
            return
        if len(set(slots)) == 1:  # one adapter for the whole step: no gather
            self.groups = [(int(slots[0]), None)]  # type: ignore[arg-type]  # not None: checked above
            return
        per_token = np.repeat([-1 if s is None else s for s in slots], query_lens)
        used = sorted({s for s in slots if s is not None})
        if len(used) <= MASKED_MAX_ADAPTERS:
            self.active = torch.tensor(used, device=device)
            self.mask = torch.from_numpy(per_token[:, None] == np.array(used)[None, :]).to(device, dtype)
            return
        self.groups = [(slot, torch.from_numpy(np.nonzero(per_token == slot)[0]).to(device)) for slot in used]


class LowRank:
    """One layer's slots: A [slots, R, in], B [out, slots, R] (so the B's of every slot are one [out, slots R]
    matrix without a copy); `add` applies the step's adapters."""

    def __init__(self, batch: LoraBatch, slots: int, rank: int, inp: int, out: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.batch = batch
        self.a = torch.zeros(slots, rank, inp, dtype=dtype, device=device)
        self.b = torch.zeros(out, slots, rank, dtype=dtype, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] += each token's (x A^T) B^T for its slot (nothing to do when the step has no adapter)."""
        if self.batch.mask is not None:
            return self._masked(x, y)
        for slot, idx in self.batch.groups:
            if idx is None:
                y.addmm_(x @ self.a[slot].T, self.b[:, slot].T)
            else:
                y.index_add_(0, idx, (x.index_select(0, idx) @ self.a[slot].T) @ self.b[:, slot].T)
        return y

    def _masked(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every active slot's A on every token, masked to the token's own slot, then the stacked B's at once."""
        assert self.batch.active is not None and self.batch.mask is not None
        k, rank = self.batch.mask.shape[1], self.a.shape[1]
        a, b = self.a, self.b
        if k < a.shape[0]:  # some slots idle: gather the active ones (all active: the stacks as they are)
            a, b = a.index_select(0, self.batch.active), b.index_select(1, self.batch.active)
        a, b = a.view(k * rank, -1), b.view(-1, k * rank)  # [k R, in], [out, k R]
        xa = (x @ a.T).view(-1, k, rank).mul_(self.batch.mask.unsqueeze(-1)).view(-1, k * rank)
        return y.addmm_(xa, b.T)

    def clear(self, slot: int) -> None:
        """Make `slot` a no-op."""
        self.a[slot].zero_()
        self.b[:, slot].zero_()

    def nbytes(self) -> int:
        """Bytes of both stacks."""
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


class ColumnLora(LowRank):
    """A column-parallel (possibly fused) layer's slots: each part has its own R rows of A; B is block-diagonal
    over parts and holds only this rank's output rows, so one matmul pair serves q, k and v (or gate and up)."""

    def __init__(self, layer: ColumnParallelLinear, batch: LoraBatch, slots: int, rank: int) -> None:
        w = layer.weight
        self.layer, self.rank = layer, rank
        super().__init__(batch, slots, rank * len(layer.out_sizes), w.shape[1], w.shape[0], w.dtype, w.device)

    def load(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Write one part's A [r, in] and this rank's rows of B [out, r] (times `scale`) into `slot`."""
        offset, start, rows = self.layer.part_rows(part)
        r, col = a.shape[0], part * self.rank
        self.a[slot, col:col + r].copy_(a)
        self.b[offset:offset + rows, slot, col:col + r].copy_(b[start:start + rows] * scale)


class RowLora(LowRank):
    """A row-parallel layer's slots: this rank's input columns of A, all of B (its delta is a partial sum)."""

    def __init__(self, layer: RowParallelLinear, batch: LoraBatch, slots: int, rank: int) -> None:
        w = layer.weight
        self.layer = layer
        super().__init__(batch, slots, rank, w.shape[1], w.shape[0], w.dtype, w.device)

    def load(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Write this rank's columns of A [r, in] and all of B [out, r] (times `scale`) into `slot`."""
        r, cols = a.shape[0], self.a.shape[2]
        start = self.layer.tp.rank * cols
        self.a[slot, :r].copy_(a[:, start:start + cols])
        self.b[:, slot, :r].copy_(b * scale)


class StageLora:
    """Every LoRA-capable layer of one stage, slot loading and the per-step batch."""

    def __init__(self, layers: nn.ModuleDict, max_loras: int, max_rank: int) -> None:
        self.batch = LoraBatch()
        self.max_loras, self.max_rank = max_loras, max_rank
        self.slots: dict[tuple[int, str], ColumnLora | RowLora] = {}  # (global layer, our layer name)
        self.names: list[str | None] = [None] * max_loras  # adapter held by each slot
        for key, block in layers.items():
            for parent, fused, part in TARGETS.values():
                if (int(key), fused) in self.slots:
                    continue
                layer = getattr(getattr(block, parent), fused)
                low: ColumnLora | RowLora = (ColumnLora(layer, self.batch, max_loras, max_rank) if part is not None
                                             else RowLora(layer, self.batch, max_loras, max_rank))
                layer.lora = low
                self.slots[(int(key), fused)] = low

    def check_slot(self, slot: int) -> None:
        """ValueError unless `slot` is one of this stage's slots."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"LoRA slot {slot} is outside [0, {self.max_loras}) (max_loras={self.max_loras})")

    def check(self, slot: int, adapter: Adapter) -> None:
        """ValueError unless `adapter` fits a slot of this stage and `slot` is one."""
        self.check_slot(slot)
        if adapter.rank > self.max_rank:
            raise ValueError(f"LoRA adapter {adapter.name!r}: rank {adapter.rank} exceeds max_lora_rank="
                             f"{self.max_rank}; raise max_lora_rank or use a lower-rank adapter")

    def load(self, slot: int, adapter: Adapter) -> None:
        """Put a checked adapter into `slot` (its modules this stage holds; the rest of the slot zeroed)."""
        self.check(slot, adapter)
        self.unload(slot)
        for (layer, module), (a, b) in adapter.weights.items():
            _, fused, part = TARGETS[module]
            low = self.slots.get((layer, fused))
            if low is not None:  # None: that layer lives on another pipeline stage
                low.load(slot, part or 0, a.to(low.a.dtype), b.to(low.b.dtype), adapter.scale)
        self.names[slot] = adapter.name

    def unload(self, slot: int) -> None:
        """Empty `slot`."""
        self.check_slot(slot)
        for low in self.slots.values():
            low.clear(slot)
        self.names[slot] = None

    def nbytes(self) -> int:
        """Bytes of every slot buffer of the stage."""
        return sum(low.nbytes() for low in self.slots.values())
