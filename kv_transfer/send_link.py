"""The sending end of a pair link: one thread drains a queue of page jobs onto the pair group, in order.

    queue: Form(gen) | Pages | Abort
    Pages jobs already queued are batched into one header frame: make() gathers each run's pages (None = its
    transfer ended), then the header is sent and, on Gloo, the receiver's clear-to-send awaited (wire.py), then
    every run; 2 batches stay in flight, so gathering overlaps the wire.
    Any send error breaks the link: the jobs in flight fail, and the next handshake forms a fresh group.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque

import torch

from splitserve.proto.v1 import kv_transfer_pb2 as pb

from . import pair_group, wire
from .control_plane import ControlPlane, StoreAddress
from .links import STOP, AbortJob, FormJob, Link, PagesJob, short_error, stream_ctx, wait_all

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 2          # batches whose sends are posted but not yet confirmed


class SendLink(Link):
    def __init__(self, name: str, address: StoreAddress, device: torch.device, control: ControlPlane,
                 connect_timeout_s: float) -> None:
        super().__init__(name, 0, address, device, control, connect_timeout_s)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._wanted_generation: int | None = None
        self._peer_token: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"kvx-send-{name}", daemon=True)
        self._thread.start()

    def generation(self, store, peer_token: str) -> int:
        """The generation a newly accepted transfer will use (control thread). Reuses the current group unless
        it broke or the receiver's link is not the one it was formed with; then queues a fresh formation."""
        stale = self.broken and self.formed_generation == self._wanted_generation
        if self._wanted_generation is None or stale or peer_token != self._peer_token:
            self._wanted_generation = pair_group.new_generation(store, self.name)
            self._peer_token = peer_token
            self._queue.put(FormJob(self._wanted_generation))
        return self._wanted_generation

    def submit(self, job: PagesJob | AbortJob) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(STOP)
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            pair_group.drop_group(self.group)

    def _run(self) -> None:
        in_flight: deque[tuple[list, tuple, list]] = deque()
        carry = None                       # a job taken while batching that belongs to the next round
        while True:
            jobs: list = []
            try:
                if carry is None and in_flight and self._queue.empty():
                    self._complete(in_flight, 1)   # nothing else to do: confirm the oldest batch
                    continue
                job, carry = (carry, None) if carry is not None else (self._queue.get(), None)
                if job is STOP:
                    return
                with stream_ctx(self.stream):
                    if isinstance(job, PagesJob):
                        jobs, carry = self._batch(job)
                        self._send_pages(jobs, in_flight)
                    else:
                        jobs = [job]
                        self._send_control(job, in_flight)
                    self._complete(in_flight, len(in_flight) - MAX_IN_FLIGHT)
            except Exception as e:   # noqa: BLE001 - any transport error breaks the link, never the thread
                self._break(short_error(e), in_flight, jobs)

    def _batch(self, first: PagesJob) -> tuple[list[PagesJob], object | None]:
        """`first` plus the page jobs already queued behind it: when the link is the bottleneck, batches grow
        and the receiver posts more receives at once."""
        jobs, size = [first], first.size_bound
        while len(jobs) < wire.MAX_RUNS:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(nxt, PagesJob) or not wire.batch_fits(size + nxt.size_bound):
                return jobs, nxt
            jobs.append(nxt)
            size += nxt.size_bound
        return jobs, None

    def _send_pages(self, jobs: list[PagesJob], in_flight: deque) -> None:
        if self.group is None:
            for j in jobs:
                j.on_error(f"pair link {self.name} is down")
            return
        header = pb.KVPageHeader(kind=pb.KVPageHeader.PAGES)
        tensors: list[torch.Tensor] = []
        for j in jobs:
            payload = j.make(self.stream)
            if payload is not None:
                run, data = payload
                header.runs.append(run)
                tensors.append(data)
        if not header.runs:
            return
        frame = wire.encode_header(header, self.device)
        if not wire.uses_cts(self.device):
            works = [self.group.send([t], 1, 0) for t in [frame, *tensors]]
            in_flight.append((works, (frame, *tensors), jobs))
            return
        cts = wire.cts_frame(self.device)
        works = [self.group.send([frame], 1, 0)]
        wait_all([self.group.recv([cts], 1, wire.CTS_TAG)], max(j.deadline for j in jobs))
        works += [self.group.send([t], 1, 0) for t in tensors]
        in_flight.append((works, (frame, *tensors), jobs))

    def _send_control(self, job: FormJob | AbortJob, in_flight: deque) -> None:
        if isinstance(job, FormJob):
            self._complete(in_flight, len(in_flight))
            self._form(job.generation)
        elif self.group is not None:
            frame = wire.encode_header(job.header, self.device)
            in_flight.append(([self.group.send([frame], 1, 0)], (frame,), [job]))

    def _complete(self, in_flight: deque, n: int) -> None:
        while n > 0 and in_flight:
            works, _, jobs = in_flight[0]
            wait_all(works, max(j.deadline for j in jobs))
            in_flight.popleft()
            n -= 1
            for j in jobs:
                if isinstance(j, PagesJob) and j.on_sent is not None:
                    j.on_sent()

    def _break(self, error: str, in_flight: deque, jobs: list) -> None:
        log.warning("kv_transfer: %s broke: %s", self.name, error)
        failed = [j for _, _, js in in_flight for j in js] + jobs
        in_flight.clear()
        self._mark_broken()
        for j in failed:
            if isinstance(j, PagesJob):
                j.on_error(f"pair link {self.name} broke: {error}")
