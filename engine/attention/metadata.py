"""What one forward step tells the attention backend about its batch.

Sequences are laid out one after another along the token dimension. Sequence `s` contributes
`query_lens[s]` new tokens whose absolute positions are `context_lens[s] - query_lens[s] ... context_lens[s] - 1`;
after the step's KV is stored, its cache holds `context_lens[s]` tokens. A new token at position p attends to
cached positions 0..p (causal). Decode is the case query_len == 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


@dataclass(slots=True)
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    cu_seqlens_q: torch.Tensor      # int32 [B + 1], prefix sums of query_lens
    context_lens_t: torch.Tensor    # int32 [B]
    block_tables: torch.Tensor      # int32 [B, max_blocks], padded with 0 (never read past context_lens)
    slot_mapping: torch.Tensor      # int64 [num_tokens], where each new token's K/V is stored
    block_size: int
    # what a backend derives from the fields above once per step and reuses in every layer (see `per_step`);
    # init=False: a dataclasses.replace() copy starts empty instead of sharing stale entries
    step_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def per_step(self, key: str, build: Callable[[], T]) -> T:
        """`build()` on the first call with `key` for this batch, the cached value afterwards: a backend's index
        and mask tensors are the same for every layer of a step."""
        if key not in self.step_cache:
            self.step_cache[key] = build()
        return self.step_cache[key]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.per_step("is_decode_only", lambda: all(q == 1 for q in self.query_lens))

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str = "cpu") -> "AttentionMetadata":
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            for p in range(c - q, c):
                slots.append(table[p // block_size] * block_size + p % block_size)
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        as_i32 = dict(dtype=torch.int32, device=device)
        return cls(
            query_lens=list(query_lens), context_lens=list(context_lens),
            cu_seqlens_q=torch.tensor(cu, **as_i32),
            context_lens_t=torch.tensor(context_lens, **as_i32),
            block_tables=torch.tensor(padded, **as_i32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_size=block_size,
        )
