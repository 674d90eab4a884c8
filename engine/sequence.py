"""A request's state inside one engine: its tokens, how many have KV in the cache, and its blocks.

Prompt and generated tokens sit in one list. `num_computed_tokens` of them have KV in the cache; the scheduler
gives each step a chunk of the rest. When a chunk reaches the end of the list the model samples one new token.
A request resumed after a fault is just a Sequence whose list already holds its committed tokens.
"""

from __future__ import annotations

import time
from enum import Enum, auto

from .sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    __slots__ = ("request_id", "token_ids", "num_prompt_tokens", "num_computed_tokens", "num_cached_tokens",
                 "block_table", "num_hashed_blocks", "status", "finish_reason", "params", "arrival_time",
                 "first_scheduled_time", "num_preemptions", "urgent")

    def __init__(self, request_id: str, token_ids: list[int], params: SamplingParams,
                 num_prompt_tokens: int | None = None) -> None:
        self.request_id = request_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids) if num_prompt_tokens is None else num_prompt_tokens
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0        # prefix-cache hits at the last admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0        # leading full blocks already registered in the prefix cache
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.params = params
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.num_preemptions = 0
        self.urgent = False               # scheduled ahead of prefills in progress (a recovery's stalled stream)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, {self.status.name})")
