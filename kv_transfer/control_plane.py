"""torch_dist's control plane: one thread per worker rank that owns its connection to the rendezvous store.

Handshake messages (plans, replies, acks: protobuf bytes) travel through the store hosted by the router. All
store I/O of a rank happens on this thread: jobs submitted from any thread run here in order, and watches (a
key to wait for) are checked here. A watch fires once: the key is read, deleted, and its callback runs on this
thread with the store at hand.

Watches are woken, not polled: whoever writes a key that a peer rank watches then rings that rank's bell
(`ring`: it sets `kvx/bell/<worker>/<rank>`). Each plane has a bell thread of its own, blocked in the store's
server-side `wait` on its bell key (no timeout, so no wake-ups while nothing happens); when it rings, the thread
deletes the key and every watch is checked at once. So a plan, reply or ack is seen within a store round trip or
two of being written, and an idle plane makes no store traffic. A ring that lands between the wake-up and the
delete is not lost: its key was written before it, and the checks that follow the delete see that key. Each watch
is also checked when created (`hot`), when `heat()`ed, and every `poll_interval_s` (or its own `interval_s`) as a
safety net: a peer that wrote its key and died before ringing. A dead store turns into transfers missing their
deadlines, never into a blocked worker thread.
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
BELL_RETRY_S = 0.05     # after a failed wait on the bell (store unreachable): try again this much later

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
        try:
            self._bell_store = address.connect()      # the bell thread's own connection: it blocks in wait()
        except Exception as e:   # noqa: BLE001
            raise ConnectionError(f"kv_transfer: cannot reach the rendezvous store at {address.host}:{address.port}: {e}") from e
        self._cv = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._watches: dict[int, _Watch] = {}
        self._next_id = 0
        self._closed = False
        self._last_error_log = 0.0
        self._thread = threading.Thread(target=self._run, name=f"kvx-control-{name}", daemon=True)
        self._bell_thread = threading.Thread(target=self._listen, name=f"kvx-bell-{name}", daemon=True)
        self._thread.start()
        self._bell_thread.start()

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
        self._thread.join(timeout=5)            # on its way out it rings the bell, which ends the bell thread
        self._bell_thread.join(timeout=2)

    def _listen(self) -> None:
        """Bell thread: sleep in the store until the bell rings, then have every watch checked."""
        forever = timedelta(days=1)
        while not self._closed:
            try:
                self._bell_store.wait([self.bell], forever)
                self._bell_store.delete_key(self.bell)
            except Exception:   # noqa: BLE001 - the store went away: the safety-net polls and deadlines remain
                time.sleep(BELL_RETRY_S)
                continue
            with self._cv:
                now = time.monotonic()
                for w in self._watches.values():
                    w.due = now
                self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._jobs and not self._watches:
                    self._cv.wait()
                if self._closed:
                    self._safely(lambda store: store.set(self.bell, b"1"))   # wakes the bell thread to exit
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
                now = time.monotonic()
                due = [(i, w) for i, w in self._watches.items() if w.due <= now]
                for _, w in due:
                    w.due = now + w.interval_s
            for job in jobs:
                self._safely(job)
            for watch_id, w in due:
                self._safely(lambda store, i=watch_id, k=w.key, cb=w.on_value: self._check(store, i, k, cb))
            with self._cv:
                if not self._closed and not self._jobs and self._watches:
                    nxt = min(w.due for w in self._watches.values())
                    self._cv.wait(timeout=max(0.0, nxt - time.monotonic()))

    def _check(self, store: Store, watch_id: int, key: str, on_value: OnValue) -> None:
        if not store.check([key]):
            return
        with self._cv:
            if self._watches.pop(watch_id, None) is None:
                return                      # unwatched meanwhile
        value = store.get(key)
        store.delete_key(key)
        on_value(store, value)

    def _safely(self, job: Job) -> None:
        try:
            job(self._store)
        except Exception:   # noqa: BLE001 - one bad job must not stop the plane; deadlines catch the rest
            now = time.monotonic()
            if now - self._last_error_log > 1.0:
                self._last_error_log = now
                log.exception("kv_transfer control plane job failed")
