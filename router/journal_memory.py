"""The in-process journal: the embedded default (one router, no Redis). Same semantics as `RedisJournal`, with
every call stored at once (nothing queued, `lag` is 0); finished records expire `ttl_s` after finishing."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import replace

from .journal import FINISHED, RUNNING, Journal, JournalError, JournalRecord, RequestIdInUse


class MemoryJournal(Journal):
    def __init__(self, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        self.ttl_s = ttl_s
        self._records: dict[str, JournalRecord] = {}
        self._expiries: deque[tuple[float, str]] = deque()   # (monotonic deadline, id), in finishing order
        self._lock = threading.Lock()

    def create(self, record: JournalRecord) -> None:
        with self._lock:
            self._expire()
            if record.request_id in self._records:
                raise RequestIdInUse(f"request_id {record.request_id!r} already has a journal record")
            self._records[record.request_id] = replace(
                record, prompt_token_ids=[int(t) for t in record.prompt_token_ids], token_ids=[], seq_sizes=[],
                state=RUNNING, finish_reason=None, error=None, finished_at=None)

    def append(self, request_id: str, tokens: list[int], seq: int) -> None:
        tokens = [int(t) for t in tokens]
        with self._lock:
            rec = self._records.get(request_id)
            if rec is None or rec.finished:
                raise JournalError(f"request {request_id!r} is not in the journal (unknown or finished)")
            if seq <= rec.last_seq:
                return                           # already stored: a retried call
            if seq != rec.last_seq + 1:
                raise JournalError(f"request {request_id!r}: append seq {seq} after {rec.last_seq} leaves a gap")
            rec.token_ids.extend(tokens)
            rec.seq_sizes.append(len(tokens))

    def finish(self, request_id: str, reason: str, error: str | None = None) -> None:
        with self._lock:
            rec = self._records.get(request_id)
            if rec is None or rec.finished:
                return
            rec.state, rec.finish_reason, rec.error, rec.finished_at = FINISHED, reason, error, time.time()
            self._expiries.append((time.monotonic() + self.ttl_s, request_id))

    def get(self, request_id: str) -> JournalRecord | None:
        with self._lock:
            self._expire()
            rec = self._records.get(request_id)
            return _copy(rec) if rec is not None else None

    def unfinished(self) -> list[JournalRecord]:
        with self._lock:
            recs = [_copy(r) for r in self._records.values() if not r.finished]
        return sorted(recs, key=lambda r: r.created_at)

    def flush(self, timeout: float | None = None) -> bool:
        return True

    @property
    def lag(self) -> int:
        return 0

    def close(self, timeout: float = 5.0) -> None:
        pass

    def _expire(self) -> None:
        now = time.monotonic()
        while self._expiries and self._expiries[0][0] <= now:
            _, rid = self._expiries.popleft()
            rec = self._records.get(rid)
            if rec is not None and rec.finished:
                del self._records[rid]


def _copy(rec: JournalRecord) -> JournalRecord:
    return replace(rec, prompt_token_ids=list(rec.prompt_token_ids), token_ids=list(rec.token_ids),
                   seq_sizes=list(rec.seq_sizes))
