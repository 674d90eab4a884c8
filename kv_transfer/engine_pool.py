"""The engine's BlockManager seen as a kv_transfer `BlockPool` (free = drop one reference)."""

from __future__ import annotations

from splitserve.engine.block_manager import BlockManager

from .block_pool import BlockPoolExhausted


class EngineBlockPool:
    def __init__(self, block_manager: BlockManager) -> None:
        self.blocks = block_manager

    @property
    def num_free(self) -> int:
        return self.blocks.num_free_blocks

    def allocate(self, n: int) -> list[int]:
        if n > self.blocks.num_free_blocks:
            raise BlockPoolExhausted(f"asked for {n} KV blocks, {self.blocks.num_free_blocks} free")
        return self.blocks.allocate_blocks(n)

    def free(self, block_ids: list[int]) -> None:
        self.blocks.free_blocks(block_ids)
