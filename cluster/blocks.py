"""KV block manager on the driver: which cache blocks each sequence owns."""
from __future__ import annotations


class BlockManager:
    """Free list of KV-cache block ids, identical on every worker of the replica."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs at least one block; "
                             "raise kv_cache_memory_bytes / gpu_memory_utilization or use a smaller model")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        """Whether `table` can be extended to hold `num_tokens`."""
        return self.blocks_for(num_tokens) - len(table) <= len(self.free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens` (caller checked `can_grow`)."""
        while len(table) < self.blocks_for(num_tokens):
            table.append(self.free.pop())

    def release(self, table: list[int]) -> None:
        """Return every block of `table` to the free list and empty it."""
        self.free.extend(reversed(table))
        table.clear()

    @property
    def usage(self) -> float:
        """Share of blocks in use."""
        return 1.0 - len(self.free) / self.num_blocks
