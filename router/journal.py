"""The request journal: what must survive a router restart, per request.

    submit ──create(record)──> journal        (awaited: a request is acknowledged once its record is stored)
    commit ──append(id, tokens, seq)──> journal   (hot path: an in-memory enqueue, written in batches)
    finish ──finish(id, reason)──> journal    (the record expires `ttl_s` later)
    router restart ──unfinished()──> records ──> requests rebuilt and re-placed with their committed tokens

A record holds the prompt token ids, the sampling parameters, the seed, the model fingerprint and the committed
tokens grouped by stream sequence number: `append(id, tokens, seq)` is the event `seq` of the request's
`RequestLog` (1, 2, 3, ... with no gap; an event may carry no token), so a rebuilt log numbers its events exactly
as the old one did and a client resumes with its last seq. An append with a seq already stored is ignored, so a
retried write never duplicates tokens.

Two stores behind one interface: `RedisJournal` (`--redis-url`, the cluster setting; `journal_redis.py`) and
`MemoryJournal` (in-process, the embedded default; `journal_memory.py`). `open_journal` picks one.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from splitserve.engine.sampling_params import SamplingParams
from splitserve.work import WorkRequest

RUNNING, FINISHED = "running", "finished"


class JournalError(Exception):
    """A journal call that cannot be honoured (unknown request, a gap in the sequence numbers, a taken id)."""


class JournalUnavailable(JournalError):
    """The store cannot be reached (Redis down at start, or for longer than a `create` may wait)."""


class RequestIdInUse(JournalError):
    """`create` for an id that already has a record (running, or finished and not yet expired)."""


@dataclass(slots=True)
class JournalRecord:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    fingerprint: str                    # the model's; a record is only resumed on the same model
    created_at: float = field(default_factory=time.time)    # wall clock (shared by routers on many hosts)
    token_ids: list[int] = field(default_factory=list)      # committed tokens, in order
    seq_sizes: list[int] = field(default_factory=list)      # tokens committed by stream event 1, 2, ... last_seq
    state: str = RUNNING
    finish_reason: str | None = None
    error: str | None = None
    finished_at: float | None = None    # wall clock

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(self.params).__name__}")
        if sum(self.seq_sizes) != len(self.token_ids):
            raise ValueError(f"seq_sizes add up to {sum(self.seq_sizes)} tokens, token_ids has {len(self.token_ids)}")

    @property
    def last_seq(self) -> int:
        return len(self.seq_sizes)

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def events(self) -> list[tuple[int, list[int]]]:
        """(seq, tokens) of every stored stream event, in order: what a rebuilt `RequestLog` replays."""
        out, start = [], 0
        for i, n in enumerate(self.seq_sizes):
            out.append((i + 1, self.token_ids[start:start + n]))
            start += n
        return out

    @classmethod
    def of_work(cls, work: WorkRequest, fingerprint: str) -> "JournalRecord":
        return cls(work.request_id, list(work.prompt_token_ids), work.params, work.seed, fingerprint)

    def to_work(self) -> WorkRequest:
        """The `WorkRequest` that resumes this request: prompt + committed tokens, same seed."""
        return WorkRequest(self.request_id, list(self.prompt_token_ids), self.params, self.seed,
                           list(self.token_ids))


class Journal(ABC):
    """Thread-safe; `append` and `finish` never block on I/O, `create` waits until the record is stored."""

    ttl_s: float

    @abstractmethod
    def create(self, record: JournalRecord) -> None:
        """Store a new record (its committed tokens are ignored: a record starts empty). Raises RequestIdInUse,
        or JournalUnavailable when the store cannot take it in time (the request must then be refused)."""

    @abstractmethod
    def append(self, request_id: str, tokens: list[int], seq: int) -> None:
        """Commit stream event `seq` (= last seq + 1) carrying `tokens`; a seq already appended is ignored.
        Raises JournalError for a request this journal does not hold (unknown or finished) or a gap."""

    @abstractmethod
    def finish(self, request_id: str, reason: str, error: str | None = None) -> None:
        """Mark the request finished; its record expires `ttl_s` later. Finishing twice is a no-op."""

    @abstractmethod
    def get(self, request_id: str) -> JournalRecord | None:
        """The stored record (None: unknown or expired). Reads the store: `flush()` first to see queued appends."""

    @abstractmethod
    def unfinished(self) -> list[JournalRecord]:
        """Every record not finished, oldest first; this journal then accepts appends to them (router restart)."""

    @abstractmethod
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every append and finish queued so far is stored; False when `timeout` ran out first."""

    @property
    @abstractmethod
    def lag(self) -> int:
        """Appends and finishes queued and not yet stored."""

    @abstractmethod
    def close(self, timeout: float = 5.0) -> None:
        """Flush (at most `timeout` seconds) and release the store."""


def open_journal(redis_url: str | None, ttl_s: float, connect_timeout: float = 5.0) -> Journal:
    """`RedisJournal` on `redis_url` (raises JournalUnavailable within `connect_timeout` when it is down), else
    an in-process `MemoryJournal`."""
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
    if redis_url:
        from .journal_redis import RedisJournal

        return RedisJournal.connect(redis_url, ttl_s=ttl_s, timeout=connect_timeout)
    from .journal_memory import MemoryJournal

    return MemoryJournal(ttl_s)
