"""torch_dist's control plane: one thread per worker rank that owns its connection to the rendezvous store.

Handshake messages (plans, replies, acks: protobuf bytes) travel through the store hosted by the router. All
store I/O of a rank happens on this thread: jobs submitted from any thread run here in order, and watches (a
key to wait for) are polled here every `poll_interval_s`. A watch fires once: the key is read, deleted, and
its callback runs on this thread with the store at hand. A dead store turns into transfers missing their
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

Job = Callable[[Store], None]
OnValue = Callable[[Store, bytes], None]


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
        self._watches: dict[int, tuple[str, OnValue]] = {}
        self._next_id = 0
        self._closed = False
        self._last_error_log = 0.0
        self._thread = threading.Thread(target=self._run, name=f"kvx-control-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    def watch(self, key: str, on_value: OnValue) -> int:
        with self._cv:
            self._next_id += 1
            self._watches[self._next_id] = (key, on_value)
            self._cv.notify()
            return self._next_id

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
                watches = list(self._watches.items())
            for job in jobs:
                self._safely(job)
            for watch_id, (key, on_value) in watches:
                self._safely(lambda store, w=watch_id, k=key, cb=on_value: self._check(store, w, k, cb))
            with self._cv:
                if not self._closed and not self._jobs:
                    self._cv.wait(timeout=self._poll_interval_s)

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
