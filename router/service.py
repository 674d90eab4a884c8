"""The contract between the front ends (HTTP, gRPC) and whatever generates tokens behind them.

Two implementations: `EngineService` (one in-process engine on a thread: `splitserve serve --embedded` and the
API tests) and the cluster `Router` (prefill and decode pools on Ray). The front ends only see this protocol.

A request's tokens form one stream of `TokenEvent`s numbered 1, 2, 3, ... (`seq`); `stream(request_id, after)`
yields every event with seq > after, so a client that lost its connection resumes with the last seq it saw and
gets no gap and no repeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from splitserve.engine.sampling_params import SamplingParams


class ServiceError(Exception):
    """An error a front end maps to a status: `kind` is invalid_argument, not_found,
    resource_exhausted (overloaded: retry later), unavailable or internal."""

    def __init__(self, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.field = kind, message, field


@dataclass(slots=True)
class GenerateRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str | None = None     # None: the service assigns one
    model: str | None = None          # None: the served model; another name is refused (invalid_argument)


@dataclass(slots=True)
class TokenEvent:
    request_id: str
    seq: int                          # 1-based sequence number of this event in the request's stream
    token_ids: list[int]              # tokens committed by this event (usually one)
    text: str                         # their text delta
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0        # total so far
    num_cached_tokens: int = 0


@dataclass(slots=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    dtype: str
    block_size: int
    fingerprint: str


@dataclass(slots=True)
class LoadInfo:
    num_running: int
    num_waiting: int
    kv_cache_usage: float             # 0..1
    num_free_blocks: int
    num_total_blocks: int
    workers: list[dict] = field(default_factory=list)


class GenerationService(Protocol):
    model_name: str

    def tokenizer(self):
        """The model's `splitserve.engine.tokenizer.Tokenizer` (encode, decode, apply_chat_template)."""

    async def submit(self, request: GenerateRequest) -> str:
        """Validate and queue a request; returns its id. Raises ServiceError(invalid_argument) for bad input."""

    def stream(self, request_id: str, after_seq: int = 0) -> AsyncIterator[TokenEvent]:
        """Events with seq > after_seq until the finishing one. Raises ServiceError(not_found) for unknown ids."""

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False when it was not running."""

    def model_info(self) -> ModelInfo: ...

    def load(self) -> LoadInfo: ...

    async def close(self) -> None: ...
