"""Chained block hashes: the prefix-cache key shared by the workers' block managers and the router's index.

The hash of block i covers the hash of block i-1 and block i's token ids, so equal hashes mean equal prefixes
(up to collisions, which the block manager rules out by comparing the tokens). blake2b, not Python's hash(),
so every process computes the same value.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence


def block_hash(prev: int | None, token_ids: Sequence[int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", -1 if prev is None else prev))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return struct.unpack("<q", h.digest())[0]


def chain_hashes(token_ids: Sequence[int], block_size: int, salt: int | None = None) -> list[int]:
    """Hashes of every *full* block of `token_ids`; `salt` (e.g. a model fingerprint) seeds the chain."""
    hashes: list[int] = []
    prev = salt
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = block_hash(prev, token_ids[start:start + block_size])
        hashes.append(prev)
    return hashes
