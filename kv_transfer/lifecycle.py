"""Status, deadline and block ownership of one transfer end, shared by every backend.

    BOOTSTRAPPING --handshake--> TRANSFERRING --all pages / ack--> DONE
          \\                          \\
           `---------- deadline, peer death, mismatch, abort ----------> FAILED

Any thread may move the state (`advance`, `fail`); only `poll()` and `abort()`, called on the owner's thread,
give blocks back to the pool, so a BlockPool never sees two threads. A receiver whose blocks are still being
written by an in-place receive when it fails (its deadline passed mid-message) parks the release: the writer
hands the blocks to `park` when it is done, and the owner's next backend call frees them.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .block_pool import BlockPool
from .messages import TransferStatus


class Lifecycle:
    def __init__(self, what: str, timeout_s: float, pool: BlockPool, blocks: list[int], *, free_on_done: bool,
                 on_fail: Callable[[str], None] | None = None, lock: threading.RLock | None = None,
                 busy: Callable[[], bool] | None = None) -> None:
        self.what = what                 # "sender req-1/0 rank 0", for messages
        self.lock = lock or threading.RLock()
        self._changed = threading.Condition(self.lock)   # notified on every status change
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.transferring_at: float | None = None   # monotonic: the handshake finished
        self.ended_at: float | None = None          # monotonic: DONE or FAILED
        self.status = TransferStatus.BOOTSTRAPPING
        self.error: str | None = None
        self._pool = pool
        self._blocks = blocks            # given back on FAILED, and on DONE when free_on_done (the sender's lease)
        self._free_on_done = free_on_done
        self._on_fail = on_fail
        self._busy = busy                # True while something writes into the blocks
        self._released = False
        self._parked = False

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def advance(self, status: TransferStatus) -> None:
        """Move forward (TRANSFERRING, DONE); ignored once terminal."""
        with self.lock:
            if not self.status.terminal:
                self.status = status
                self._stamp(status)
                self._changed.notify_all()

    def fail(self, reason: str) -> bool:
        """Turn FAILED (once); runs the on_fail hook under the lock. False if already terminal."""
        with self.lock:
            if self.status.terminal:
                return False
            self.status, self.error = TransferStatus.FAILED, f"{self.what}: {reason}"
            self._stamp(self.status)
            self._changed.notify_all()
            if self._on_fail is not None:
                self._on_fail(self.error)
            return True

    def _stamp(self, status: TransferStatus) -> None:
        now = time.monotonic()
        if status is TransferStatus.TRANSFERRING or (status.terminal and self.transferring_at is None):
            self.transferring_at = now
        if status.terminal:
            self.ended_at = now

    def transfer_seconds(self) -> float | None:
        """Once terminal: from the end of the handshake (pages may flow) to DONE / FAILED; None before."""
        with self.lock:
            if self.ended_at is None or self.transferring_at is None:
                return None
            return self.ended_at - self.transferring_at

    def wait(self, timeout_s: float) -> None:
        """Block until terminal, the deadline, or `timeout_s` (the owner then calls poll())."""
        end = min(time.monotonic() + timeout_s, self.deadline)
        with self.lock:
            while not self.status.terminal and (left := end - time.monotonic()) > 0:
                self._changed.wait(left)

    def poll(self) -> TransferStatus:
        with self.lock:
            if not self.status.terminal and time.monotonic() > self.deadline:
                self.fail(f"deadline of {self.timeout_s:g}s passed while {self.status.value}")
            status = self.status
            if status.terminal and not self._released:
                if status is TransferStatus.FAILED and self._busy is not None and self._busy():
                    self._parked = True          # the writer releases them (see release_parked)
                    return status
                self._released = True
                if status is TransferStatus.FAILED or self._free_on_done:
                    self._pool.free(list(self._blocks))
            return status

    def release_parked(self, park: Callable[[list[int]], None]) -> None:
        """The writer finished: hand parked blocks to `park` (to be freed on the owner's thread)."""
        with self.lock:
            if self._parked and not self._released:
                self._released = True
                park(list(self._blocks))
