"""Typed results shared by the sync `Client` and the asyncio `AsyncClient`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0    # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Chunk:
    """New tokens of a streamed request; `seq` numbers the chunks of one request 1, 2, 3, ... with no gap."""
    request_id: str
    seq: int
    token_ids: list[int]
    text: str                 # the text delta of these tokens


@dataclass(frozen=True, slots=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str        # stop | length | abort
    usage: Usage


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    dtype: str
    block_size: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    worker_id: str
    role: str
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    state: str
    num_migrating_out: int = 0     # requests whose KV it still sends to another worker (their blocks stay held)


@dataclass(frozen=True, slots=True)
class LoadInfo:
    num_running: int
    num_waiting: int
    kv_cache_usage: float     # 0..1
    num_free_blocks: int
    num_total_blocks: int
    workers: list[WorkerLoad] = field(default_factory=list)
