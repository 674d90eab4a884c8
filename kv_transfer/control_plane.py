"""torch_dist's control plane: one thread per worker rank that owns its connection to the rendezvous store.

Handshake messages (plans, replies, acks: protobuf bytes) travel through the store hosted by the router. All
store I/O of a rank happens on this thread: jobs submitted from any thread run here in order, and watches (a
key to wait for) are polled here, each on its own schedule: every `poll_interval_s` (or its own, longer
`interval_s` when its answer is not urgent), and every HOT_POLL_S while it is hot: for HOT_WINDOW_S after it
was created hot or `heat()`ed, because its answer is due within a millisecond or two (a handshake step, an ack
after the last page) and waiting a whole interval would add that much to the transfer. A watch fires once: the
key is read, deleted, and its callback runs on this thread with the store at hand. A dead store turns into
transfers missing their deadlines, never into a blocked worker thread.
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

HOT_POLL_S = 0.0002     # poll interval while a hot watch is younger than HOT_WINDOW_S
HOT_WINDOW_S = 0.05

Job = Callable[[Store], None]
OnValue = Callable[[Store, bytes], None]


@dataclass(slots=True)
class _Watch:
    key: str
    on_value: OnValue
    interval_s: float
    hot_until: float         # monotonic; poll every HOT_POLL_S until then
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
        """Call `on_value` once `key` exists. `hot`: the value is expected any moment (see the module doc);
        `interval_s`: poll this one less often than `poll_interval_s` (its answer is not urgent)."""
        with self._cv:
            self._next_id += 1
            now = time.monotonic()
            self._watches[self._next_id] = _Watch(key, on_value, interval_s or self._poll_interval_s,
                                                  now + HOT_WINDOW_S if hot else 0.0, now)
            self._cv.notify()
            return self._next_id

    def heat(self, watch_id: int | None) -> None:
        """The watched value is now due any moment: check at once, then every HOT_POLL_S for a while."""
        with self._cv:
            w = self._watches.get(watch_id)
            if w is not None:
                w.hot_until = w.due = time.monotonic()
                w.hot_until += HOT_WINDOW_S
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
                due = [(i, w) for i, w in self._watches.items() if w.due <= now]
                for _, w in due:
                    w.due = now + (HOT_POLL_S if now < w.hot_until else w.interval_s)
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
