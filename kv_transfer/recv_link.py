"""The receiving end of a pair link: one thread receives, another delivers.

    ends are registered per transfer; a stream is open once the sender accepted
    while any stream is open: receive a header (deadline = the latest open stream's wire deadline), post every
    page-run receive it announces at once, plus the next header's when more is certain, then (Gloo) send the
    clear-to-send that lets the sender post the pages (wire.py); contiguous destination runs
    land in place, the rest in staging; a staged run is handed over as it lands (delivery: scatter, bookkeeping),
    runs landing in place are handed over with the next staged run or the batch's last: receives complete in
    order, so the thread sleeps once per batch, not once per message
    ABORT closes one stream; any receive error or timeout breaks the link: open streams fail and the link takes
    a new token, so the sender's next handshake forms a fresh group
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from splitserve.proto.v1 import kv_transfer_pb2 as pb

from . import pair_group, wire
from .control_plane import ControlPlane, StoreAddress
from .links import STOP, Link, short_error, stream_ctx, wait_all

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RecvTarget:
    """Where one run's pages (K and V side by side) are received: a view of the KV tensor (in place) or a
    staging tensor."""

    data: torch.Tensor
    in_place: bool = False
    discard: bool = False    # received only to keep the stream in step


def discard_target(run: pb.KVPageRun, device: torch.device) -> RecvTarget:
    return RecvTarget(torch.empty(run.payload_bytes, dtype=torch.uint8, device=device), discard=True)


class RecvEnd(Protocol):
    """One transfer's page stream as the RecvLink sees it (a receiver's pull)."""

    generation: int
    wire_deadline: float
    pages_total: int         # pages this stream carries in all (it may also end early with an ABORT)

    def targets(self, run: pb.KVPageRun) -> RecvTarget: ...              # link thread, before receiving

    def on_pages(self, run: pb.KVPageRun, target: RecvTarget) -> bool: ...  # delivery thread; True: all in

    def on_lost(self, target: RecvTarget) -> None: ...                   # its receive failed

    def on_abort(self, error: str) -> None: ...

    def on_link_error(self, error: str) -> None: ...


class RecvLink(Link):
    """Receives on one thread and delivers (scatter, bookkeeping) on another, so the wire never waits for
    copies; delivery keeps the wire's order, so layers complete in the order they were sent."""

    def __init__(self, name: str, address: StoreAddress, device: torch.device, control: ControlPlane,
                 connect_timeout_s: float) -> None:
        super().__init__(name, 1, address, device, control, connect_timeout_s)
        self.token = uuid.uuid4().hex          # this link's incarnation, sent in every plan
        self._cv = threading.Condition()
        self._ends: dict[tuple[str, int], RecvEnd] = {}
        self._open: set[tuple[str, int]] = set()      # streams the sender will still write to
        self._got: dict[tuple[str, int], int] = {}    # pages received on the wire per stream
        self._target_generation = -1
        self._closed = False
        self._deliveries: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0                                  # deliveries handed to the delivery thread, not done
        self._thread = threading.Thread(target=self._run, name=f"kvx-recv-{name}", daemon=True)
        self._delivery = threading.Thread(target=self._deliver, name=f"kvx-deliver-{name}", daemon=True)
        self._thread.start()
        self._delivery.start()

    def expect(self, key: tuple[str, int], end: RecvEnd) -> None:
        """Register a transfer before its handshake, so early pages find it."""
        with self._cv:
            self._ends[key] = end

    def open(self, key: tuple[str, int]) -> None:
        """The sender accepted: pages (or an ABORT) will come on generation `end.generation`."""
        with self._cv:
            end = self._ends.get(key)
            if end is None or self._got.get(key, 0) >= end.pages_total:
                return              # its pages already all arrived (before the reply was read)
            self._open.add(key)
            self._target_generation = max(self._target_generation, end.generation)
            self._cv.notify()

    def forget(self, key: tuple[str, int]) -> None:
        with self._cv:
            self._ends.pop(key, None)
            self._open.discard(key)
            self._got.pop(key, None)

    def close(self) -> None:
        """Stops the threads; one blocked in a receive returns by its wire deadline at the latest, so close()
        waits a bounded time and leaves the rest to the daemon thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._deliveries.put(STOP)
        self._thread.join(timeout=2)
        self._delivery.join(timeout=2)
        if not self._thread.is_alive():
            pair_group.drop_group(self.group)

    def _mark_broken(self) -> None:
        super()._mark_broken()
        self.token = uuid.uuid4().hex          # the next plan tells the sender to form a new group

    def _fail_open(self, error: str, keep: Callable[[RecvEnd], bool] = lambda e: False) -> None:
        with self._cv:
            gone = [k for k in self._open if not keep(self._ends[k])]
            ends = [self._ends.pop(k) for k in gone]
            for k in gone:
                self._open.discard(k)
                self._got.pop(k, None)
        for end in ends:
            end.on_link_error(error)

    def _run(self) -> None:
        pending: tuple[torch.Tensor, object] | None = None   # a header receive posted ahead of time
        while True:
            with self._cv:
                while not self._closed and not self._open:
                    self._cv.wait()
                if self._closed:
                    return
                target = self._target_generation
                deadline = max(self._ends[k].wire_deadline for k in self._open)
            if self.group is None or self.formed_generation != target:
                pending = None
                if self.formed_generation is not None and target <= self.formed_generation:
                    # a broken generation is never re-formed; transfers promised on it fail
                    self._fail_open(f"pair link {self.name} generation {target} is broken",
                                    keep=lambda e: e.generation > target)
                    continue
                self._fail_open(f"pair link {self.name} moved to generation {target}",
                                keep=lambda e: e.generation == target)
                if not self._form(target):
                    self._fail_open(f"pair link {self.name} could not be formed")
                    continue
            try:
                with stream_ctx(self.stream):
                    pending = self._receive_batch(deadline, pending)
            except Exception as e:   # noqa: BLE001
                pending = None
                log.warning("kv_transfer: %s broke: %s", self.name, short_error(e))
                self._mark_broken()
                self._fail_open(f"pair link {self.name} broke: {short_error(e)}")

    def _post_header(self) -> tuple[torch.Tensor, object]:
        frame = wire.empty_header(self.device)
        return frame, self.group.recv([frame], 0, 0)

    def _receive_batch(self, deadline: float, pending: tuple[torch.Tensor, object] | None):
        """Receive one header and everything it announces; returns the next header receive when one was
        posted ahead (so the sender never waits for us to come back around)."""
        frame, work = pending or self._post_header()
        wait_all([work], deadline)
        header = wire.decode_header(frame)
        if header.kind == pb.KVPageHeader.ABORT:
            key = (header.request_id, header.attempt)
            with self._cv:
                end = self._ends.get(key)
                self._open.discard(key)
            if end is not None:
                self._hand_over((key, end, header.error, None))
            return None
        posted, counts, start = [], {}, 0
        try:
            for run in header.runs:
                key = (run.request_id, run.attempt)
                with self._cv:
                    end = self._ends.get(key)
                target = end.targets(run) if end is not None else discard_target(run, self.device)
                works: list = []             # listed before posting: a post that raises still loses its target
                posted.append((key, end, run, target, works))
                works.append(self.group.recv([target.data], 0, 0))
                counts[key] = counts.get(key, 0) + run.count
            with self._cv:
                # every open stream ends with its last page or an ABORT: pages left after this batch mean more comes
                more = any(self._ends[k].pages_total - self._got.get(k, 0) - counts.get(k, 0) > 0 for k in self._open)
                for key, n in counts.items():
                    self._got[key] = self._got.get(key, 0) + n
                    end = self._ends.get(key)
                    if end is not None and self._got[key] >= end.pages_total:
                        self._open.discard(key)
            ahead = self._post_header() if more else None
            cts = ([self.group.send([wire.cts_frame(self.device)], 0, wire.CTS_TAG)] if wire.uses_cts(self.device)
                   else [])
            for i, (_, _, _, target, _) in enumerate(posted):
                if target.in_place and i < len(posted) - 1:
                    continue      # nothing to copy: its bookkeeping can wait for the next staged run or the last
                group = posted[start:i + 1]
                wait_all([w for *_, works in group for w in works], deadline)
                if self.stream is not None:
                    self.stream.synchronize()
                for key, end, run, target, _ in group:
                    if end is not None:
                        self._hand_over((key, end, run, target))
                start = i + 1
        except Exception:
            # every target handed out and not delivered ends here, whether its receive was posted, failed to post
            # or never landed: a receiver counts in-place writes until then and holds its blocks while it does
            for _, e, _, t, _ in posted[start:]:
                if e is not None:
                    e.on_lost(t)
            raise
        wait_all(cts, deadline)        # long done: the sender answered it with the pages just received
        return ahead

    def _hand_over(self, item: tuple) -> None:
        """Runs received in place need no copy: deliver them here unless earlier ones are still queued (which
        keeps the wire's order); everything else goes to the delivery thread."""
        with self._cv:
            inline = item[3] is not None and item[3].in_place and self._queued == 0
            if not inline:
                self._queued += 1
        if inline:
            self._deliver_one(item)
        else:
            self._deliveries.put(item)

    def _deliver(self) -> None:
        while True:
            item = self._deliveries.get()
            if item is STOP:
                return
            self._deliver_one(item)
            with self._cv:
                self._queued -= 1

    def _deliver_one(self, item: tuple) -> None:
        key, end, run, target = item
        try:
            with stream_ctx(self.stream):
                if target is None:
                    self.forget(key)
                    end.on_abort(run)             # run holds the ABORT's error text
                elif end.on_pages(run, target):
                    self.forget(key)
        except Exception:   # noqa: BLE001 - a bad delivery fails its transfer, not the link
            log.exception("kv_transfer: delivering pages on %s failed", self.name)
            end.on_link_error("delivering pages failed")
