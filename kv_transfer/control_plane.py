"""torch_dist's control plane: one thread per worker rank that owns its connection to the rendezvous store.

Handshake messages (plans, replies, acks: protobuf bytes) travel through the store hosted by the router. All
store I/O of a rank happens on this thread: jobs submitted from any thread run here in order, and watches (a
key to wait for) are checked here. A watch fires once: the key is read, deleted, and its callback runs on this
thread with the store at hand.

Watches are not polled: whoever writes a key that a peer rank watches then rings that rank's doorbell (`ring`),
a UDP datagram carrying the key's name, sent to the address the peer published under `kvx/doorbell/<worker>/<rank>`.
The control thread sleeps in `select` on its doorbell socket until a datagram comes or a watch is due, and a
datagram makes only the watches on its key due. While waiting, the only store traffic is each watch's
safety-net check, however many watches wait (a decode worker holds one per request placed on it until that
request's prefill starts, seconds under load).

A doorbell is a hint, never the message: the datagram names a key, and the key is read from the store. A lost
or forged datagram costs at most one extra store check. Each watch is also checked when created (`hot`), when
`heat()`ed, and every `poll_interval_s` (or its own `interval_s`) as a safety net, for a datagram lost or a peer
that wrote its key and died before ringing. A ring that arrives before its watch exists is remembered for
UNCLAIMED_S. A dead store turns into transfers missing their deadlines, never into a blocked worker thread.

    writer's control thread                          watcher's control thread, asleep in select()
    store.set(key, message)
    ring(endpoint, key)  ── UDP datagram "key" ──>   wakes; the watches on "key" are due:
                                                     store.check/get/delete(key) -> on_value(store, message)

(A bell key in the store, checked every 5 ms, came first; a thread blocked in the store's server-side `wait`
came second but stalled pair-group connects in the in-process tests. The datagram needs neither.)
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from torch.distributed import Store, TCPStore

log = logging.getLogger(__name__)

DOORBELL_PREFIX = "kvx/doorbell/"
PEER_TTL_S = 1.0          # how long a peer's published doorbell address is used before it is read again
UNCLAIMED_S = 5.0         # how long a ring for a key nobody watches yet is remembered
MAX_UNCLAIMED = 4096
MAX_DATAGRAM = 2048       # keys are short; anything longer is not ours
WAKE = b""                # a datagram a rank sends itself: jobs or watches changed

Job = Callable[[Store], None]
OnValue = Callable[[Store, bytes], None]


def doorbell_key(endpoint: str) -> str:
    """The store key under which `endpoint` (a worker rank, "<worker>/<rank>") publishes its doorbell."""
    return DOORBELL_PREFIX + endpoint


def _local_address(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The family and local IP this machine uses to reach the store: peers reach the router the same way, so
    they can reach this address too."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)              # UDP connect sends nothing: it only picks the route
        return family, probe.getsockname()[0]


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
        family, ip = _local_address(address.host, address.port)
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind((ip, 0))
        self._sock.setblocking(False)
        self._own = self._sock.getsockname()[:2]
        self.doorbell = doorbell_key(name)
        self._store.set(self.doorbell, f"{self._own[0]}:{self._own[1]}")
        self._poll_interval_s = poll_interval_s
        self._peers: dict[str, tuple[tuple[str, int] | None, float]] = {}   # endpoint -> (address, read at)
        self._unclaimed: dict[str, float] = {}                               # key rung, nobody watching -> when
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
        self._wake()

    def watch(self, key: str, on_value: OnValue, hot: bool = False, interval_s: float | None = None) -> int:
        """Call `on_value` once `key` exists (woken by the writer's `ring`). `hot`: check it at once (the value
        may already be there); `interval_s`: the safety-net poll of this one, instead of `poll_interval_s`."""
        with self._cv:
            self._next_id += 1
            interval = interval_s or self._poll_interval_s
            now = time.monotonic()
            hot = hot or self._unclaimed.pop(key, None) is not None
            self._watches[self._next_id] = _Watch(key, on_value, interval, now if hot else now + interval)
            watch_id = self._next_id
        self._wake()
        return watch_id

    def heat(self, watch_id: int | None) -> None:
        """The watched value is due now: check at once (a ring may have come before the watch existed)."""
        with self._cv:
            w = self._watches.get(watch_id)
            if w is None:
                return
            w.due = time.monotonic()
        self._wake()

    def unwatch(self, watch_id: int | None) -> None:
        with self._cv:
            self._watches.pop(watch_id, None)

    @property
    def num_watches(self) -> int:
        with self._cv:
            return len(self._watches)

    def ring(self, store: Store, endpoint: str, key: str) -> None:
        """Control thread, after writing `key` that `endpoint`'s control plane watches: wake it. Best effort; its
        safety-net check covers a ring that does not arrive."""
        peer = self._peer(store, endpoint)
        if peer is None:
            return
        try:
            self._sock.sendto(key.encode(), peer)
        except OSError as e:
            log.debug("kv_transfer: ringing %s at %s failed: %s", endpoint, peer, e)

    def close(self) -> None:
        with self._cv:
            self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._sock.close()

    # --- control thread -------------------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._sock.sendto(WAKE, self._own)
        except OSError:
            pass                     # closed, or the buffer is full of wake-ups already

    def _peer(self, store: Store, endpoint: str) -> tuple[str, int] | None:
        now = time.monotonic()
        cached = self._peers.get(endpoint)
        if cached is not None and now - cached[1] < PEER_TTL_S:
            return cached[0]
        key, peer = doorbell_key(endpoint), None
        if store.check([key]):
            host, _, port = store.get(key).decode().rpartition(":")
            peer = (host, int(port))
        self._peers[endpoint] = (peer, now)
        return peer

    def _rung(self) -> set[str]:
        """The keys named by the datagrams that came since the last call."""
        keys: set[str] = set()
        while True:
            try:
                data = self._sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return keys
            except ConnectionRefusedError:
                continue                   # an ICMP error from an earlier ring; the next datagram may be there
            except OSError:
                return keys
            if data:
                try:
                    keys.add(data.decode())
                except UnicodeDecodeError:
                    pass

    def _run(self) -> None:
        while True:
            rung = self._rung()
            with self._cv:
                if self._closed:
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
                now = time.monotonic()
                claimed = set()
                for w in self._watches.values():
                    if w.key in rung:
                        w.due = now
                        claimed.add(w.key)
                self._remember_unclaimed(rung - claimed, now)
            for job in jobs:
                self._safely(job)
            with self._cv:
                due = [(i, w) for i, w in self._watches.items() if w.due <= now]
                for _, w in due:
                    w.due = now + w.interval_s
            for watch_id, w in due:
                self._safely(lambda store, i=watch_id, k=w.key, cb=w.on_value: self._check(store, i, k, cb))
            with self._cv:
                if self._closed:
                    return
                if self._jobs:
                    continue
                timeout = None
                if self._watches:
                    timeout = max(0.0, min(w.due for w in self._watches.values()) - time.monotonic())
            try:
                select.select([self._sock], [], [], timeout)
            except (OSError, ValueError):
                return                               # the socket was closed under us

    def _remember_unclaimed(self, keys: set[str], now: float) -> None:
        """Under the lock: rings that found no watch, for a watch created right after (its key may be written)."""
        if self._unclaimed:
            for k in [k for k, t in self._unclaimed.items() if now - t > UNCLAIMED_S]:
                del self._unclaimed[k]
        for k in keys:
            if len(self._unclaimed) < MAX_UNCLAIMED:
                self._unclaimed[k] = now

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
