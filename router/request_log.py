"""Per-request event logs: the numbered `TokenEvent`s of each request, kept so a client can resume its stream.

    engine thread:  log.append(event)  ──wake──>  asyncio readers:  async for ev in log.follow(after_seq)

Appends come from one producer thread; readers live on any asyncio loop and are woken through
`loop.call_soon_threadsafe`. A finished request's log is kept for `ttl_s` so `Resume` works after completion.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator

from .service import TokenEvent


class RequestLog:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.events: list[TokenEvent] = []     # events[i].seq == i + 1
        self.finished_at: float | None = None  # monotonic time of the finishing event
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def last_seq(self) -> int:
        return len(self.events)

    def append(self, event: TokenEvent) -> None:
        """Number `event` (seq = next) and wake every reader. Ignored once the log is finished."""
        with self._lock:
            if self.finished_at is not None:
                return
            event.seq = len(self.events) + 1
            self.events.append(event)
            if event.finished:
                self.finished_at = time.monotonic()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:      # the reader's loop is closed: nobody is waiting any more
                pass

    async def follow(self, after_seq: int = 0) -> AsyncIterator[TokenEvent]:
        """Events with seq > after_seq, then live ones, until the finishing event."""
        loop = asyncio.get_running_loop()
        seen = after_seq
        while True:
            with self._lock:
                new = self.events[seen:]
                fut = None
                if not new and self.finished_at is None:
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if fut is not None:
                try:
                    await fut
                finally:
                    if not fut.done():
                        fut.cancel()
                continue
            for event in new:
                seen = event.seq
                yield event
                if event.finished:
                    return
            if not new:
                return


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class RequestLogs:
    """All logs by request id; finished ones expire `ttl_s` after finishing."""

    def __init__(self, ttl_s: float = 300.0) -> None:
        self.ttl_s = ttl_s
        self._logs: dict[str, RequestLog] = {}
        self._lock = threading.Lock()

    def create(self, request_id: str) -> RequestLog | None:
        """A new log, or None when `request_id` is taken."""
        with self._lock:
            if request_id in self._logs:
                return None
            log = self._logs[request_id] = RequestLog(request_id)
            return log

    def get(self, request_id: str) -> RequestLog | None:
        with self._lock:
            return self._logs.get(request_id)

    def discard(self, request_id: str) -> None:
        """Forget a log whose request was refused before it was acknowledged, so that its id is free again."""
        with self._lock:
            self._logs.pop(request_id, None)

    def unfinished(self) -> list[RequestLog]:
        with self._lock:
            return [log for log in self._logs.values() if not log.finished]

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            old = [rid for rid, log in self._logs.items()
                   if log.finished_at is not None and now - log.finished_at > self.ttl_s]
            for rid in old:
                del self._logs[rid]
        return len(old)

    def __len__(self) -> int:
        return len(self._logs)
