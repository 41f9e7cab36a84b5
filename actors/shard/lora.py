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


class LoraBatch:
    """The current step's tokens grouped by adapter slot, shared by every LoRA layer of the stage."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor | None]] = []  # (slot, token indices; None = every token)

    def set(self, slots: Sequence[int | None] | None, query_lens: Sequence[int], device: torch.device) -> None:
        """Expand per-sequence slots to per-token groups (empty when no sequence uses an adapter)."""
        self.groups = []
        if slots is None or all(s is None for s in slots):
            return
        if len(set(slots)) == 1:  # one adapter for the whole step: no gather
            self.groups = [(int(slots[0]), None)]  # type: ignore[arg-type]  # not None: checked above
            return
        starts = np.concatenate([[0], np.cumsum(query_lens)[:-1]])
        for slot in sorted({s for s in slots if s is not None}):
            idx = np.concatenate([np.arange(starts[i], starts[i] + query_lens[i])
                                  for i, s in enumerate(slots) if s == slot])
            self.groups.append((slot, torch.from_numpy(idx).to(device)))


class LowRank:
    """One layer's slots: A [slots, R, in], B [slots, out, R]; `add` applies the step's adapters."""

    def __init__(self, batch: LoraBatch, slots: int, rank: int, inp: int, out: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.batch = batch
        self.a = torch.zeros(slots, rank, inp, dtype=dtype, device=device)
        self.b = torch.zeros(slots, out, rank, dtype=dtype, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] += each token's (x A^T) B^T, grouped by slot (nothing to do when the step has no adapter)."""
        for slot, idx in self.batch.groups:
            if idx is None:
                y.add_((x @ self.a[slot].T) @ self.b[slot].T)
            else:
                y.index_add_(0, idx, (x.index_select(0, idx) @ self.a[slot].T) @ self.b[slot].T)
        return y

    def clear(self, slot: int) -> None:
        """Make `slot` a no-op."""
        self.a[slot].zero_()
        self.b[slot].zero_()

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
        self.b[slot, offset:offset + rows, col:col + r].copy_(b[start:start + rows] * scale)


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
        self.b[slot, :, :r].copy_(b * scale)


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

    def load(self, slot: int, adapter: Adapter) -> None:
        """Put a checked adapter into `slot` (its modules this stage holds; the rest of the slot zeroed)."""
        self.check_slot(slot)
        if adapter.rank > self.max_rank:
            raise ValueError(f"LoRA adapter {adapter.name!r}: rank {adapter.rank} exceeds max_lora_rank="
                             f"{self.max_rank}; raise max_lora_rank or use a lower-rank adapter")
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
