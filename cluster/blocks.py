"""KV block manager on the driver: which cache blocks each sequence owns, and which full blocks are reusable."""
from __future__ import annotations

from collections import OrderedDict

BlockKey = tuple[int, tuple[int, ...]]  # (content id of the previous block, -1 at the start; this block's tokens)
ROOT_DIGEST = 0  # the digest "before" a prompt's first block


def chain_digest(parent: int, block: tuple[int, ...]) -> int:
    """A block's content digest, chained to the blocks before it. Only a routing hint (a collision misroutes,
    never shares KV: cache lookups use exact keys). A tuple of ints hashes the same in every process (hash
    randomization covers str and bytes only), so routers and replicas agree without exchanging tokens."""
    return hash((parent, block))


def prompt_digests(tokens: list[int], block_size: int) -> list[int]:
    """Chained digests of the full blocks of `tokens`, as `BlockManager.digests` reports cached ones."""
    out, parent = [], ROOT_DIGEST
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = chain_digest(parent, tuple(tokens[start:start + block_size]))
        out.append(parent)
    return out


class BlockManager:
    """Block ids, identical on every worker of the replica, with reference counts and an optional prefix cache.

    With prefix caching, every full block a sequence has computed is registered under its tokens and the
    content of the blocks before it. A later sequence whose prompt starts with the same blocks takes them
    as they are (reference counted, never written: new tokens always land past them) and skips their
    prefill. Released blocks that hold registered content stay reusable until space is needed, oldest first.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs at least one block; "
                             "raise kv_cache_memory_bytes / gpu_memory_utilization or use a smaller model")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # unreferenced, content forgotten
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, content reusable (LRU first)
        self.refs = [0] * num_blocks
        self.by_key: dict[BlockKey, int] = {}
        self.key_of: dict[int, BlockKey] = {}
        self.content_id: dict[int, int] = {}  # fresh per registration: a reused block id never aliases old content
        self.digest: dict[int, int] = {}  # content id -> chain digest (what the replica reports to routers)
        self._next_id = 0

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def num_available(self) -> int:
        """Blocks that can be handed out now (free, or cached and unreferenced)."""
        return len(self.free) + len(self.cached)

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        """Whether `table` can be extended to hold `num_tokens`."""
        return self.blocks_for(num_tokens) - len(table) <= self.num_available

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens` (caller checked `can_grow`)."""
        while len(table) < self.blocks_for(num_tokens):
            table.append(self._take())

    def _take(self) -> int:
        """A block for new content: a free one, else the least recently used cached one (its content dropped)."""
        if self.free:
            block = self.free.pop()
        else:
            block, _ = self.cached.popitem(last=False)
            del self.by_key[self.key_of.pop(block)]
            self.digest.pop(self.content_id.pop(block), None)
        self.refs[block] = 1
        return block

    def release(self, table: list[int]) -> None:
        """Drop `table`'s reference to each of its blocks and empty it; unreferenced blocks become available."""
        for block in reversed(table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.cached[block] = None
                else:
                    self.free.append(block)
        table.clear()

    def match_prefix(self, tokens: list[int], root: int = -1) -> tuple[list[int], int]:
        """Take the cached blocks that hold the longest full-block prefix of `tokens`; returns (blocks, parent id).

        At least the last token is left out so the step that follows still computes its logits. `root` is the
        parent of the first block: -1 for the base model, another negative id per LoRA adapter (whose KV differs).
        """
        if not self.prefix_caching:
            return [], root
        blocks, parent, size = [], root, self.block_size
        for start in range(0, len(tokens) - 1 - size + 1, size):
            block = self.by_key.get((parent, tuple(tokens[start:start + size])))
            if block is None:
                break
            if self.refs[block] == 0:
                del self.cached[block]
            self.refs[block] += 1
            blocks.append(block)
            parent = self.content_id[block]
        return blocks, parent

    def register(self, table: list[int], tokens: list[int], num_computed: int, done: int, parent: int
                 ) -> tuple[int, int]:
        """Register the full blocks of `table` computed since `done` of them were; returns (done, parent) anew.

        When identical content is already registered under another block, the chain continues from that one
        and this block simply stays private.
        """
        if not self.prefix_caching:
            return done, parent
        size = self.block_size
        for i in range(done, num_computed // size):
            key = (parent, tuple(tokens[i * size:(i + 1) * size]))
            known = self.by_key.get(key)
            if known is None:  # new content: this block now answers for it
                known = table[i]
                self.by_key[key], self.key_of[known] = known, key
                self.content_id[known], self._next_id = self._next_id, self._next_id + 1
                before = ROOT_DIGEST if parent == -1 else self.digest.get(parent)
                if before is not None:  # None: the parent's content was recycled meanwhile (a hint is lost)
                    self.digest[self.content_id[known]] = chain_digest(before, key[1])
            parent = self.content_id[known]
        return max(done, num_computed // size), parent

    def digests(self, limit: int) -> list[int]:
        """Digests of the reusable (cached or referenced) blocks, the `limit` most recently registered."""
        return list(self.digest.values())[-limit:]

    @property
    def usage(self) -> float:
        """Share of blocks referenced by running sequences."""
        return 1.0 - self.num_available / self.num_blocks
