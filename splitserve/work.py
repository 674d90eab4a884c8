"""Typed messages between the router and the workers (they travel through Ray's own calls)."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class WorkRequest:
    """Everything a worker needs to (re)start a request: the journal record at this moment."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    committed_token_ids: list[int] = field(default_factory=list)   # tokens already streamed (recovery)
    attempt: int = 0                                                # placements so far (transfer keys differ)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.committed_token_ids


@dataclass(slots=True)
class TokenUpdate:
    """New tokens of one request from one decode step; a worker sends a list of these per step."""
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None          # the worker could not continue this request (router re-places it)
    num_cached_tokens: int = 0
    attempt: int = 0                  # the placement this update belongs to: older ones are stale
    kv_bytes: int = 0                 # first update after the request's KV arrived: bytes received (all TP ranks)
    kv_seconds: float | None = None   # and the transfer's time, handshake to last page (KVReceiver.transfer_seconds)


@dataclass(slots=True)
class WorkerLoad:
    worker_id: str
    role: str
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    queued_prefill_tokens: int = 0
    prefix_hashes: list[int] = field(default_factory=list)
    prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    draining: bool = False
    healthy: bool = True
    num_migrating_out: int = 0        # migrated requests whose KV is still being sent (their blocks stay pinned)


@dataclass(slots=True)
class MigrationState:
    """A request detached from a draining decode worker: its tokens and how many of them have KV."""
    token_ids: list[int]              # prompt + every generated token, including the one not yet decoded
    num_prompt_tokens: int
    num_computed_tokens: int          # the KV being sent covers token_ids[:num_computed_tokens]
