"""torch_dist's control plane: one thread per worker rank that owns its connection to the rendezvous store.

Handshake messages (plans, replies, acks: protobuf bytes) travel through the store hosted by the router. All
store I/O of a rank happens on this thread: jobs submitted from any thread run here in order, and watches (a
key to wait for) are checked here. A watch fires once: the key is read, deleted, and its callback runs on this
thread with the store at hand.

Watches are not polled one by one: whoever writes a key that a peer rank watches then rings that rank's bell
(`ring`: it sets `kvx/bell/<worker>/<rank>`). While a rank has watches pending, its control thread checks only its
own bell key, every BELL_POLL_S: one store round trip however many watches wait (a decode worker holds one per
request placed on it until that request's prefill starts, seconds under load). When the bell rang it deletes it
and checks every watch. A ring that lands between that check and the delete is not lost: its key was written
before it, and the watch checks come after the delete. Each watch is also checked when created (`hot`), when
`heat()`ed, and every `poll_interval_s` (or its own `interval_s`) as a safety net, for a peer that wrote its key
and died before ringing. An idle rank (no watches) makes no store traffic. A dead store turns into transfers
missing their deadlines, never into a blocked worker thread.

(A bell thread blocked in the store's server-side `wait` would save the polls, but with it, pair-group formation
connects to the store were seen to stall for the 3 s connect timeout in the in-process tests; not understood, so
not used.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from torch.distributed import Store, TCPStore

log = logging.getLogger(__name__)

BELL_PREFIX = "kvx/bell/"
BELL_POLL_S = 0.005     # how often a rank with pending watches checks its bell

Job = Callable[[Store], None]
OnValue = Callable[[Store, bytes], None]


def bell_key(endpoint: str) -> str:
    """The key that wakes the control plane of `endpoint` (a worker rank, "<worker>/<rank>")."""
    return BELL_PREFIX + endpoint


def ring(store: Store, endpoint: str) -> None:
    """Wake `endpoint`'s control plane: call after writing a key one of its watches waits for."""
    store.set(bell_key(endpoint), b"1")


@dataclass(slots=True)
class _Watch:
    key: str
    on_value: OnValue
    interval_s: float
    due: float               # monotonic; next check


@dataclass(frozen=True, slots=True)
class StoreAddress:
    host: str
    port: int
    timeout_s: float

    def connect(self) -> TCPStore:
        """A new client connection (each pair-group formation gets its own; TCPStore clients are not shared
        across threads here)."""
        return TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=self.timeout_s),
                        wait_for_workers=False)


class ControlPlane:
    def __init__(self, address: StoreAddress, poll_interval_s: float, name: str) -> None:
        try:
            self._store = address.connect()
        except Exception as e:   # noqa: BLE001 - torch raises several types here
            raise ConnectionError(f"kv_transfer: cannot reach the rendezvous store at {address.host}:{address.port}: {e}") from e
        self._poll_interval_s = poll_interval_s
        self.bell = bell_key(name)
        self._bell_due = 0.0                           # monotonic: next check of the bell
        self._cv = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._watches: dict[int, _Watch] = {}
        self._next_id = 0
        self._closed = False
        self._last_error_log = 0.0
        self._thread = threading.Thread(target=self._run, name=f"kvx-control-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    def watch(self, key: str, on_value: OnValue, hot: bool = False, interval_s: float | None = None) -> int:
        """Call `on_value` once `key` exists (woken by the writer's `ring`). `hot`: check it at once (the value
        may already be there); `interval_s`: the safety-net poll of this one, instead of `poll_interval_s`."""
        with self._cv:
            self._next_id += 1
            interval = interval_s or self._poll_interval_s
            now = time.monotonic()
            self._watches[self._next_id] = _Watch(key, on_value, interval, now if hot else now + interval)
            self._cv.notify()
            return self._next_id

    def heat(self, watch_id: int | None) -> None:
        """The watched value is due now: check at once (a ring may have come before the watch existed)."""
        with self._cv:
            w = self._watches.get(watch_id)
            if w is not None:
                w.due = time.monotonic()
                self._cv.notify()

    def unwatch(self, watch_id: int | None) -> None:
        with self._cv:
            self._watches.pop(watch_id, None)

    @property
    def num_watches(self) -> int:
        with self._cv:
            return len(self._watches)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._jobs and not self._watches:
                    self._cv.wait()
                if self._closed:
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
                now = time.monotonic()
                bell = bool(self._watches) and now >= self._bell_due
                if bell:
                    self._bell_due = now + BELL_POLL_S
            for job in jobs:
                self._safely(job)
            if bell and self._safely(self._rang):
                with self._cv:
                    for w in self._watches.values():
                        w.due = now
            with self._cv:
                due = [(i, w) for i, w in self._watches.items() if w.due <= now]
                for _, w in due:
                    w.due = now + w.interval_s
            for watch_id, w in due:
                self._safely(lambda store, i=watch_id, k=w.key, cb=w.on_value: self._check(store, i, k, cb))
            with self._cv:
                if not self._closed and not self._jobs and self._watches:
                    nxt = min(self._bell_due, *(w.due for w in self._watches.values()))
                    self._cv.wait(timeout=max(0.0, nxt - time.monotonic()))

    def _rang(self, store: Store) -> bool:
        """True (and the bell reset) if someone rang since the last check."""
        if not store.check([self.bell]):
            return False
        store.delete_key(self.bell)
        return True

    def _check(self, store: Store, watch_id: int, key: str, on_value: OnValue) -> None:
        if not store.check([key]):
            return
        with self._cv:
            if self._watches.pop(watch_id, None) is None:
                return                      # unwatched meanwhile
        value = store.get(key)
        store.delete_key(key)
        on_value(store, value)

    def _safely(self, job: Callable[[Store], object]) -> object:
        try:
            return job(self._store)
        except Exception:   # noqa: BLE001 - one bad job must not stop the plane; deadlines catch the rest
            now = time.monotonic()
            if now - self._last_error_log > 1.0:
                self._last_error_log = now
                log.exception("kv_transfer control plane job failed")
