"""The journal in Redis (`--redis-url`): what a cluster uses, so a restarted or second router finds every request.

    create ──(Lua, this thread, retried until create_timeout)──> Redis       acknowledged when it returns
    append / finish ──enqueue──> queue ──writer thread: one pipeline per batch (Lua per op)──> Redis
                                          └─ connection lost / LOADING / OOM: reconnect, retry the same batch

Appends are idempotent by seq (the script stores event `seq` only when it is last_seq + 1), so a batch retried
after a lost reply never duplicates a token, and the queue keeps its order across an outage. With Redis'
`appendonly yes` (`appendfsync always` for no loss on a crash), a Redis restart loses no acknowledged request.

Keys (one prefix per kind, so no request id can collide with another request's keys):
    splitserve:req:<id>      hash: prompt ("1,2,3"), params (JSON), seed, fingerprint, created_at, state,
                             finish_reason, error, finished_at, last_seq
    splitserve:tokens:<id>   list of committed token ids
    splitserve:seqs:<id>     list: tokens committed by stream event 1, 2, ... last_seq
    splitserve:unfinished    set of running request ids
A finished request's three keys expire after ttl_s and it leaves the set.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from splitserve.engine.sampling_params import SamplingParams

from .journal import FINISHED, RUNNING, Journal, JournalError, JournalRecord, JournalUnavailable, RequestIdInUse

log = logging.getLogger(__name__)
T = TypeVar("T")

UNFINISHED = "splitserve:unfinished"
MAX_BATCH = 4096                     # ops per pipeline round trip (a backlog after an outage goes in chunks)
# Replies that pass (failover, memory freed, script cache reloaded, snapshot fixed): the write is tried again.
_RETRYABLE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, redis.exceptions.NoScriptError,
                     redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError,
                     redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)
_RETRYABLE_REPLIES = ("BUSY", "MISCONF")

# KEYS: record, tokens, seqs, unfinished. ARGV: id, created_at, prompt, then field/value pairs.
_CREATE = """
local old = redis.call('HMGET', KEYS[1], 'created_at', 'prompt')
if old[1] then
  if old[1] == ARGV[2] and old[2] == ARGV[3] then return 1 end   -- our own create, retried
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'prompt', ARGV[3], unpack(ARGV, 4))
redis.call('SADD', KEYS[4], ARGV[1])
return 1
"""

# KEYS: record, tokens, seqs. ARGV: seq, tokens... Returns 1 stored, 0 already stored, -1 no record,
# -2 gap, -3 finished.
_APPEND = """
local rec = redis.call('HMGET', KEYS[1], 'last_seq', 'state')
if not rec[1] then return -1 end
local last, seq = tonumber(rec[1]), tonumber(ARGV[1])
if seq <= last then return 0 end
if rec[2] ~= 'running' then return -3 end
if seq ~= last + 1 then return -2 end
for i = 2, #ARGV, 1000 do redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
redis.call('RPUSH', KEYS[3], #ARGV - 1)
redis.call('HSET', KEYS[1], 'last_seq', seq)
return 1
"""

# KEYS: record, tokens, seqs, unfinished. ARGV: id, reason, error ('' = none), finished_at, ttl_ms.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then redis.call('SREM', KEYS[4], ARGV[1]) return -1 end
if state == 'finished' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'finished', 'finish_reason', ARGV[2], 'finished_at', ARGV[4])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"""


def _keys(request_id: str) -> list[str]:
    return [f"splitserve:req:{request_id}", f"splitserve:tokens:{request_id}", f"splitserve:seqs:{request_id}"]


@dataclass(slots=True)
class _Append:
    request_id: str
    seq: int
    tokens: list[int]


@dataclass(slots=True)
class _Finish:
    request_id: str
    reason: str
    error: str
    finished_at: float


class RedisJournal(Journal):
    def __init__(self, url: str, ttl_s: float, create_timeout: float = 2.0) -> None:
        """Use `connect`, which checks that Redis answers before anything relies on it."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        if create_timeout <= 0:
            raise ValueError(f"create_timeout must be > 0, got {create_timeout!r}")
        self.url, self.ttl_s, self.create_timeout = url, ttl_s, create_timeout
        no_retry = Retry(NoBackoff(), 0)          # retries are ours: bounded by a deadline, or the writer's loop
        try:
            self._calls = redis.Redis.from_url(url, decode_responses=True, retry=no_retry,
                                               socket_connect_timeout=min(0.5, create_timeout),
                                               socket_timeout=create_timeout)
            self._writes = redis.Redis.from_url(url, decode_responses=True, retry=no_retry,
                                                socket_connect_timeout=1.0, socket_timeout=10.0)
        except ValueError as e:
            raise JournalUnavailable(f"invalid Redis URL {redact(url)}: {e}; fix or drop --redis-url") from None
        self._create = self._calls.register_script(_CREATE)
        self._shas: tuple[str, str] | None = None   # the writer's scripts, loaded on its connection
        self._last: dict[str, int] = {}           # last seq queued, per request this journal holds
        self._finishing: dict[str, int] = {}      # finishes queued and not yet stored (count per id)
        self._queue: deque[_Append | _Finish] = deque()
        self._inflight = 0
        self._queued_total = self._stored_total = 0
        self._stopping = self._abandon = False
        self._cond = threading.Condition()
        self._writer = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._writer.start()

    @classmethod
    def connect(cls, url: str, ttl_s: float, timeout: float = 5.0, create_timeout: float = 2.0) -> "RedisJournal":
        """A journal on `url` once Redis answers PING; JournalUnavailable within `timeout` seconds if it does not."""
        deadline = time.monotonic() + timeout
        probe = _probe_client(url, timeout)
        try:
            while True:
                try:
                    probe.ping()
                    break
                except (redis.RedisError, OSError) as e:
                    if time.monotonic() + 0.2 >= deadline:
                        raise JournalUnavailable(f"cannot reach Redis at {redact(url)}: {e}; start Redis or "
                                                 "drop --redis-url") from None
                    time.sleep(0.2)
        finally:
            probe.close()
        return cls(url, ttl_s, create_timeout)

    # ---- the calls ------------------------------------------------------------------------------------
    def create(self, record: JournalRecord) -> None:
        keys = _keys(record.request_id) + [UNFINISHED]
        fields = {"params": json.dumps(record.params.to_dict()), "seed": str(record.seed),
                  "fingerprint": record.fingerprint, "state": RUNNING, "last_seq": "0"}
        args = [record.request_id, repr(record.created_at), _ints(record.prompt_token_ids)]
        args += [x for kv in fields.items() for x in kv]
        # Retried within create_timeout; a retry of a create that landed (reply lost) finds its own record.
        # After JournalUnavailable the request is refused; should the write have landed anyway, the record is
        # an orphan a restarted router resumes for nobody (it ends at max_tokens and expires).
        ok = self._with_deadline("store the request", lambda: self._create(keys=keys, args=args))
        if not ok:
            raise RequestIdInUse(f"request_id {record.request_id!r} already has a journal record")
        with self._cond:
            self._last[record.request_id] = 0

    def append(self, request_id: str, tokens: list[int], seq: int) -> None:
        tokens = [int(t) for t in tokens]
        with self._cond:
            last = self._last.get(request_id)
            if last is None:
                raise JournalError(f"request {request_id!r} is not in the journal (unknown or finished)")
            if seq <= last:
                return                           # already queued: a retried call
            if seq != last + 1:
                raise JournalError(f"request {request_id!r}: append seq {seq} after {last} leaves a gap")
            self._last[request_id] = seq
            self._enqueue(_Append(request_id, seq, tokens))

    def finish(self, request_id: str, reason: str, error: str | None = None) -> None:
        with self._cond:
            if self._last.pop(request_id, None) is None:
                return
            self._enqueue(_Finish(request_id, reason, error or "", time.time()))

    def get(self, request_id: str) -> JournalRecord | None:
        return self._with_deadline("read the journal", lambda: self._read([request_id]))[0]

    def unfinished(self) -> list[JournalRecord]:
        ids = sorted(self._with_deadline("read the journal", lambda: self._calls.smembers(UNFINISHED)))
        recs: list[JournalRecord] = []
        for i in range(0, len(ids), 512):
            chunk = ids[i:i + 512]
            recs += [r for r in self._with_deadline("read the journal", lambda: self._read(chunk))
                     if r is not None and not r.finished]
        with self._cond:
            recs = [r for r in recs if r.request_id not in self._finishing]
            for r in recs:
                self._last.setdefault(r.request_id, r.last_seq)
        return sorted(recs, key=lambda r: r.created_at)

    def flush(self, timeout: float | None = None) -> bool:
        with self._cond:
            target = self._queued_total
            return self._cond.wait_for(lambda: self._stored_total >= target, timeout)

    @property
    def lag(self) -> int:
        with self._cond:
            return len(self._queue) + self._inflight

    def close(self, timeout: float = 5.0) -> None:
        flushed = self.flush(timeout)
        with self._cond:
            if not flushed:
                log.error("journal: closing with %d writes not stored (Redis at %s unreachable)",
                          len(self._queue) + self._inflight, redact(self.url))
                self._abandon = True
            self._stopping = True
            self._cond.notify_all()
        self._writer.join(timeout=15.0)
        self._calls.close()
        self._writes.close()

    # ---- reads ----------------------------------------------------------------------------------------
    def _read(self, ids: list[str]) -> list[JournalRecord | None]:
        pipe = self._calls.pipeline(transaction=True)        # one consistent snapshot per read
        for rid in ids:
            rec, tokens, seqs = _keys(rid)
            pipe.hgetall(rec)
            pipe.lrange(tokens, 0, -1)
            pipe.lrange(seqs, 0, -1)
        replies = pipe.execute()
        return [_record(rid, *replies[3 * i:3 * i + 3]) for i, rid in enumerate(ids)]

    def _with_deadline(self, what: str, call: Callable[[], T]) -> T:
        """`call`, retried on connection errors until create_timeout; then JournalUnavailable."""
        deadline = time.monotonic() + self.create_timeout
        delay = 0.02
        while True:
            try:
                return call()
            except (redis.RedisError, OSError) as e:
                if not _retryable(e):
                    raise JournalError(f"Redis at {redact(self.url)} refused to {what}: {e}") from e
                if time.monotonic() + delay >= deadline:
                    raise JournalUnavailable(f"cannot {what}: Redis at {redact(self.url)} did not answer within "
                                             f"{self.create_timeout:g}s ({e})") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)

    # ---- the writer thread ----------------------------------------------------------------------------
    def _enqueue(self, op: _Append | _Finish) -> None:
        """Queue one write; the caller holds self._cond."""
        if isinstance(op, _Finish):
            self._finishing[op.request_id] = self._finishing.get(op.request_id, 0) + 1
        self._queue.append(op)
        self._queued_total += 1
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
                self._inflight = len(batch)
            self._store(batch)
            with self._cond:
                for op in batch:
                    if isinstance(op, _Finish):
                        n = self._finishing.pop(op.request_id) - 1
                        if n:
                            self._finishing[op.request_id] = n
                self._inflight = 0
                self._stored_total += len(batch)
                self._cond.notify_all()

    def _store(self, batch: list[_Append | _Finish]) -> None:
        """Write `batch` in one round trip; on a connection error reconnect and write it again (idempotent)."""
        delay, failed_since, last_warned = 0.02, None, 0.0
        while True:
            try:
                if self._shas is None:               # again after a reconnect: Redis may have restarted
                    self._shas = (self._writes.script_load(_APPEND), self._writes.script_load(_FINISH))
                append_sha, finish_sha = self._shas
                pipe = self._writes.pipeline(transaction=False)
                for op in batch:
                    if isinstance(op, _Append):
                        pipe.evalsha(append_sha, 3, *_keys(op.request_id), op.seq, *op.tokens)
                    else:
                        pipe.evalsha(finish_sha, 4, *_keys(op.request_id), UNFINISHED, op.request_id, op.reason,
                                     op.error, repr(op.finished_at), int(self.ttl_s * 1000))
                replies = pipe.execute(raise_on_error=False)
                retry = next((r for r in replies if isinstance(r, Exception) and _retryable(r)), None)
                if retry is not None:
                    raise retry
                break
            except Exception as e:
                self._shas = None
                if not _retryable(e):
                    log.error("journal: dropping %d writes Redis refused: %s", len(batch), e)
                    return
                if isinstance(e, redis.exceptions.NoScriptError):
                    continue                         # scripts flushed (restart without the AOF): load, go again
                now = time.monotonic()
                if failed_since is None:
                    failed_since, last_warned = now, now
                    log.warning("journal: Redis at %s unreachable (%s); holding %d writes and retrying",
                                redact(self.url), e, len(batch))
                elif now - last_warned > 10:
                    last_warned = now
                    log.warning("journal: Redis at %s unreachable for %.0fs (%s); %d writes waiting",
                                redact(self.url), now - failed_since, e, self.lag)
                with self._cond:
                    if self._cond.wait_for(lambda: self._abandon, delay):
                        return
                delay = min(delay * 2, 0.5)
        if failed_since is not None:
            log.warning("journal: Redis at %s back after %.1fs", redact(self.url), time.monotonic() - failed_since)
        for op, reply in zip(batch, replies):
            if isinstance(reply, Exception) or (isinstance(op, _Append) and reply < 0):
                log.error("journal: %s of %s was not stored: %s", type(op).__name__.strip("_").lower(),
                          op.request_id, _REFUSALS.get(reply, reply))


_REFUSALS = {-1: "no record (expired, or its create was never stored)", -2: "a gap in seq", -3: "already finished"}


def _retryable(e: BaseException) -> bool:
    if isinstance(e, _RETRYABLE_ERRORS):
        return True                              # BusyLoadingError (Redis loading its AOF) is a ConnectionError
    return isinstance(e, redis.ResponseError) and str(e).startswith(_RETRYABLE_REPLIES)


def _probe_client(url: str, timeout: float) -> redis.Redis:
    try:
        return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=min(1.0, timeout),
                                    socket_timeout=min(1.0, timeout))
    except ValueError as e:
        raise JournalUnavailable(f"invalid Redis URL {redact(url)}: {e}; fix or drop --redis-url") from None


def _ints(values: list[int]) -> str:
    return ",".join(str(int(v)) for v in values)


def _record(request_id: str, h: dict, tokens: list[str], seqs: list[str]) -> JournalRecord | None:
    if not h:
        return None
    return JournalRecord(
        request_id=request_id,
        prompt_token_ids=[int(t) for t in h["prompt"].split(",") if t],
        params=SamplingParams.from_dict(json.loads(h["params"])),
        seed=int(h["seed"]),
        fingerprint=h["fingerprint"],
        created_at=float(h["created_at"]),
        token_ids=[int(t) for t in tokens],
        seq_sizes=[int(n) for n in seqs],
        state=FINISHED if h.get("state") == FINISHED else RUNNING,
        finish_reason=h.get("finish_reason"),
        error=h.get("error"),
        finished_at=float(h["finished_at"]) if "finished_at" in h else None,
    )


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
