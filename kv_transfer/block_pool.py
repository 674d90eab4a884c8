"""What kv_transfer needs from a block manager, and a minimal one for tests.

The engine's block manager is adapted to `BlockPool` by its owner (for a prefix-caching manager, `free` is a
reference-count decrement). kv_transfer only calls the pool from the thread that calls `create_receiver`,
`poll` and `abort` (the worker's step loop), so a pool needs no locking.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class BlockPoolExhausted(RuntimeError):
    """Not enough free blocks; nothing was allocated."""


@runtime_checkable
class BlockPool(Protocol):
    def allocate(self, n: int) -> list[int]: ...

    def free(self, block_ids: list[int]) -> None: ...

    @property
    def num_free(self) -> int: ...


class SimpleBlockPool:
    """Blocks 0..num_blocks-1; allocation hands out the lowest free ids (so fresh pools give contiguous runs)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"SimpleBlockPool.num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))   # a stack; pop() yields ascending ids
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"allocate(n) needs n >= 0, got {n}")
        if n > len(self._free):
            raise BlockPoolExhausted(f"asked for {n} blocks, {len(self._free)} free of {self.num_blocks}")
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free?)")
        for b in block_ids:
            self._used.remove(b)
        self._free.extend(sorted(block_ids, reverse=True))
        self._free.sort(reverse=True)
