"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts and a prefix cache.

Plain Python, no torch. A full, computed block is registered under its chained hash (`block_hash.py`); a later
sequence whose prompt starts with the same tokens shares it (reference count + 1) instead of recomputing it.
A freed block keeps its hash while it sits in the free list, so it can be revived until it is reused; the free
list is ordered least-recently-freed first, which makes reuse evict the coldest cached blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .block_hash import block_hash
from .sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, salt: int | None = None) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.salt = salt          # the model fingerprint: caches of different models never match
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}   # hash -> block id
        self.prefix_hits = 0                # tokens served from the cache (a metric)
        self.prefix_queries = 0             # prompt tokens looked up

    # ---- capacity -------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- prefix cache ---------------------------------------------------------------------------------
    def cached_prefix_hashes(self, limit: int = 4096) -> list[int]:
        """Hashes this worker can serve from cache (advertised to the router's placement)."""
        return list(self._cached)[-limit:]

    def match_prefix(self, seq: Sequence) -> int:
        """Acquire the longest cached prefix of `seq` (full blocks, leaving >= 1 token to compute)."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "match_prefix on an admitted sequence"
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        prev = self.salt
        matched: list[int] = []
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = block_hash(prev, tokens)
            block_id = self._cached.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            matched.append(block_id)
        for block_id in matched:
            self._acquire(block_id)
        seq.block_table = matched
        seq.num_hashed_blocks = len(matched)
        seq.num_computed_tokens = seq.num_cached_tokens = len(matched) * bs
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens
        return seq.num_cached_tokens

    def commit(self, seq: Sequence) -> None:
        """Register every block of `seq` that became full and computed."""
        bs = self.block_size
        prev = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else self.salt
        for i in range(seq.num_hashed_blocks, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = block.hash = block_hash(prev, block.token_ids)
            self._cached.setdefault(prev, block.block_id)
            seq.num_hashed_blocks = i + 1

    # ---- allocation -----------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_new_tokens` more tokens; False (nothing changed) if full."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def free(self, seq: Sequence) -> None:
        self.free_blocks(reversed(seq.block_table))
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    # ---- raw blocks (kv_transfer's BlockPool protocol) ------------------------------------------------
    @property
    def num_free(self) -> int:
        return self.num_free_blocks

    def allocate_blocks(self, n: int) -> list[int]:
        if n > self.num_free_blocks:
            raise MemoryError(f"need {n} KV blocks, {self.num_free_blocks} free")
        return [self._take_free() for _ in range(n)]

    def free_blocks(self, block_ids) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def pin_blocks(self, block_ids) -> None:
        """Take one more reference on each block (a KV sender keeps its pages until the receiver confirms)."""
        for block_id in block_ids:
            if self.blocks[block_id].ref_count <= 0:
                raise RuntimeError(f"block {block_id} is free; only blocks in use can be pinned")
            self._acquire(block_id)

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            del self._cached[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id
