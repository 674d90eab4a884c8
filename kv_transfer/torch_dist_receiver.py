"""torch_dist receiver: one request's KV arriving at one decode TP rank.

    create_receiver(spec, cached)     allocate blocks; per sender rank s it pulls from:   BOOTSTRAPPING
      control: set plan/<s>/<d>, watch claim/<s>/<d>
    claim = accepted reply            check fingerprint again, open the wire on link s->d  TRANSFERRING (all s)
    link thread: header, K, V         contiguous destination runs land in place, others in staging
    delivery thread                   scatter staging into block_table (layer by layer)    completed_layers()
    every page from s                 control: set ack/<s>/<d> = ok                        DONE (all s)
    FAILED (deadline, link broke,     CAS claim := cancel if s has not replied yet; else ack/<s>/<d> = error
      sender ABORT, abort(), mismatch)  (the sender then ABORTs the stream); blocks freed at the next poll()
"""

from __future__ import annotations

import functools

import torch

from splitserve.proto.v1 import kv_transfer_pb2 as pb

from . import pages
from .base import KVReceiver
from .handshake import mismatch
from .lifecycle import Lifecycle
from .recv_link import RecvTarget, discard_target
from .messages import TransferSpec, TransferStatus
from .rank_context import RankContext, control_key
from .reshard import HeadPull, pulls_to


class _PullIn:
    """One HeadPull arriving here: its handshake state and page counts (a links.RecvEnd)."""

    def __init__(self, rx: TorchDistReceiver, pull: HeadPull) -> None:
        ctx = rx.ctx
        self.rx, self.pull = rx, pull
        self.heads = pull.dst_slice(ctx.layout.total_kv_heads, ctx.layout.tp_size)
        self.full_heads = self.heads == slice(0, ctx.layout.num_kv_heads)
        self.link = ctx.links.recv_link(rx.spec.src.endpoint(pull.src_rank), rx.spec.dst.endpoint(pull.dst_rank))
        self.pages_total = len(rx.needed) * ctx.layout.num_layers
        self.announced = [0] * ctx.layout.num_layers   # pages per layer the link has been told about
        self.received = [0] * ctx.layout.num_layers    # pages per layer delivered
        self.layers_in = 0                             # layers whose every page was delivered
        self.complete = not rx.needed                  # every page in (or the stream was closed by ABORT)
        self.published = self.replied = self.accepted = self.acked = False
        self.generation = -1
        self.wire_deadline = rx.life.deadline + ctx.grace_s
        self.watch: int | None = None

    def key(self, kind: str) -> str:
        return control_key(self.rx.spec, kind, self.pull.src_rank, self.pull.dst_rank)

    def targets(self, run: pb.KVPageRun) -> RecvTarget:
        return self.rx._targets(self, run)

    def on_pages(self, run: pb.KVPageRun, target: RecvTarget) -> bool:
        return self.rx._on_pages(self, run, target)

    def on_lost(self, target: RecvTarget) -> None:
        self.rx._write_done(target)

    def on_abort(self, error: str) -> None:
        self.complete = True
        self.rx.life.fail(f"sender rank {self.pull.src_rank} aborted: {error}")

    def on_link_error(self, error: str) -> None:
        self.complete = True
        self.rx.life.fail(error)


class TorchDistReceiver(KVReceiver):
    def __init__(self, ctx: RankContext, spec: TransferSpec, table: list[int], new: list[int],
                 timeout_s: float) -> None:
        self.ctx, self.spec, self._table = ctx, spec, table
        self.needed = list(range(len(table) - len(new), len(table)))
        self._dst_ids = list(new)                      # block id of each needed page (table[needed[i]])
        self._one_run = pages.is_run(new)              # then every run of pages lands in place
        self.wire_key = (spec.request_id, spec.attempt)
        self._writing = 0                              # writes into our blocks in progress (receives, scatters)
        self.life = Lifecycle(f"receiver {spec.key} rank {ctx.layout.tp_rank}", timeout_s, ctx.pool, new,
                              free_on_done=False, on_fail=self._on_fail, busy=lambda: self._writing > 0)
        self._completed: list[int] = []
        pulls = pulls_to(ctx.layout.total_kv_heads, spec.src.tp_size, spec.dst.tp_size, ctx.layout.tp_rank)
        self._ins = [_PullIn(self, p) for p in pulls]
        self._missing = [len(self._ins) if self.needed else 0] * ctx.layout.num_layers
        for p in self._ins:
            if not p.complete:                         # a fully cached request has no page stream
                p.link.expect(self.wire_key, p)
        ctx.control.submit(self._publish)

    # --- the KVReceiver interface (caller's thread) ---------------------------------------------------------

    @property
    def block_table(self) -> list[int]:
        return list(self._table)

    def completed_layers(self) -> list[int]:
        with self.life.lock:
            return list(self._completed)

    def poll(self) -> TransferStatus:
        self.ctx.drain()
        return self.life.poll()

    def wait(self, timeout_s: float) -> TransferStatus:
        self.life.wait(timeout_s)
        return self.poll()

    def abort(self, reason: str = "aborted by receiver") -> None:
        self.life.fail(reason)
        self.poll()

    def transfer_seconds(self) -> float | None:
        return self.life.transfer_seconds()

    @property
    def error(self) -> str | None:
        return self.life.error

    # --- control thread -------------------------------------------------------------------------------------

    def _plan(self, p: _PullIn) -> bytes:
        return pb.KVTransferPlan(
            request_id=self.spec.request_id, attempt=self.spec.attempt, receiver=self.ctx.info,
            num_tokens=self.spec.num_tokens, block_indices=self.needed, head_start=p.pull.head_start,
            head_end=p.pull.head_end, receiver_tp_rank=p.pull.dst_rank, link_token=p.link.token).SerializeToString()

    def _publish(self, store) -> None:
        """Publish even if we already failed: the cancel queued behind this job then reaches the sender,
        which would otherwise wait out its lease."""
        for p in self._ins:
            with self.life.lock:
                p.published = True
            store.set(p.key("plan"), self._plan(p))
            self.ctx.control.ring(store, self.spec.src.endpoint(p.pull.src_rank), p.key("plan"))
            p.watch = self.ctx.control.watch(p.key("claim"), functools.partial(self._on_claim, p), hot=True)

    def _on_claim(self, p: _PullIn, store, value: bytes) -> None:
        self._handle_reply(p, pb.KVTransferReply.FromString(value), store)

    def _handle_reply(self, p: _PullIn, reply: pb.KVTransferReply, store) -> None:
        with self.life.lock:
            p.replied = True
            if not reply.accepted:
                p.link.forget(self.wire_key)
                self.life.fail(reply.error or f"sender rank {p.pull.src_rank} refused the transfer")
                return
            p.accepted, p.generation = True, reply.link_generation
            if not p.complete:
                p.link.open(self.wire_key)       # pages or an ABORT will come; drain them even if we failed
            if self.life.terminal:
                self._nack(p, store)
                return
            error = mismatch(reply.sender, self.ctx.info)
            if error is not None:
                self.life.fail(error)
                return
            if all(q.accepted for q in self._ins):
                self.life.advance(TransferStatus.TRANSFERRING)
            self._check_complete(p)

    def _ack(self, p: _PullIn, store, ok: bool, error: str = "") -> None:
        if not p.acked:
            p.acked = True
            store.set(p.key("ack"), pb.KVTransferAck(ok=ok, error=error).SerializeToString())
            self.ctx.control.ring(store, self.spec.src.endpoint(p.pull.src_rank), p.key("ack"))

    def _nack(self, p: _PullIn, store) -> None:
        self._ack(p, store, False, self.life.error or "receiver failed")

    def _after_fail(self, store) -> None:
        for p in self._ins:
            with self.life.lock:
                if not p.published:
                    continue
                if p.replied:
                    if p.accepted:
                        self._nack(p, store)
                    continue
            self.ctx.control.unwatch(p.watch)
            cancel = pb.KVTransferReply(accepted=False, cancelled_by_receiver=True,
                                        error=self.life.error or "").SerializeToString()
            result = store.compare_set(p.key("claim"), "", cancel)
            if result == cancel:
                p.link.forget(self.wire_key)      # the sender will see the cancel and send nothing
            else:
                store.delete_key(p.key("claim"))
                self._handle_reply(p, pb.KVTransferReply.FromString(result), store)

    def _on_fail(self, error: str) -> None:   # under life.lock, any thread
        self.ctx.control.submit(self._after_fail)

    # --- link and delivery threads --------------------------------------------------------------------------

    def _targets(self, p: _PullIn, run: pb.KVPageRun) -> RecvTarget:
        """Link thread, before receiving `run`: the blocks themselves when they form one run covering every
        local head (zero copy), else staging tensors for the delivery thread to scatter."""
        layout = self.ctx.layout
        with self.life.lock:
            error = self._check_run(p, run)
            if error is None:
                p.announced[run.layer] += run.count
            elif not self.life.terminal:
                self.life.fail(error)
            shape = (run.count, 2, layout.block_size, run.num_heads, layout.head_dim)
            if error is not None or self.life.terminal:
                return discard_target(run, self.ctx.kv.device)
            ids = self._dst_ids[run.first:run.first + run.count]
            if p.full_heads and (self._one_run or pages.is_run(ids)):
                view = self.ctx.run_view(run.layer, ids[0], run.count)
                if view is not None:
                    self._writing += 1
                    return RecvTarget(view, in_place=True)
            return RecvTarget(torch.empty(shape, dtype=layout.dtype, device=self.ctx.kv.device))

    def _check_run(self, p: _PullIn, run: pb.KVPageRun) -> str | None:
        layout = self.ctx.layout
        if not 0 <= run.layer < layout.num_layers:
            return f"page run names layer {run.layer} of {layout.num_layers}"
        if run.first != p.announced[run.layer] or run.first + run.count > len(self.needed):
            return (f"layer {run.layer}: pages [{run.first}, {run.first + run.count}) announced, expected from "
                    f"{p.announced[run.layer]} of {len(self.needed)}")
        expect = 2 * run.count * layout.block_size * p.pull.num_heads * layout.head_dim * self.ctx.kv.element_size()
        if run.num_heads != p.pull.num_heads or run.payload_bytes != expect:
            return f"page run of {run.payload_bytes} bytes / {run.num_heads} heads, expected {expect} / {p.pull.num_heads}"
        return None

    def _write_done(self, target: RecvTarget) -> None:
        """An in-place receive ended (landed or lost)."""
        if target.in_place:
            with self.life.lock:
                self._writes_ended(1)

    def _writes_ended(self, n: int) -> None:
        """Under the lock: once nothing writes into our blocks, a parked release can go ahead."""
        self._writing -= n
        if self._writing == 0:
            self.life.release_parked(self.ctx.parked.append)

    def _on_pages(self, p: _PullIn, run: pb.KVPageRun, target: RecvTarget) -> bool:
        """Delivery thread: scatter (unless received in place) and count; True once the stream is complete.
        The copy runs outside the lock (so poll() never waits for it), counted as a write in progress."""
        with self.life.lock:
            scatter = not (self.life.terminal or target.in_place or target.discard)
            self._writing += scatter
        if scatter:
            ids = self._dst_ids[run.first:run.first + run.count]
            pages.scatter(self.ctx.kv, run.layer, ids, p.heads, target.data)
            pages.synchronize(self.ctx.kv.device)
        with self.life.lock:
            self._writes_ended(int(scatter) + int(target.in_place))
            if 0 <= run.layer < len(p.received):
                p.received[run.layer] += run.count
                if p.received[run.layer] == len(self.needed):
                    p.layers_in += 1
                    self._missing[run.layer] -= 1
                    if self._missing[run.layer] == 0 and not self.life.terminal:
                        self._completed.append(run.layer)
            p.complete = p.layers_in == len(p.received)
            if p.complete:
                self._check_complete(p)
            return p.complete

    def _check_complete(self, p: _PullIn) -> None:
        """Under the lock: ack a finished pull, and finish the transfer when every pull is in."""
        if self.life.terminal or not (p.accepted and p.complete):
            return
        self.ctx.control.submit(lambda store: self._ack(p, store, True))
        if all(q.accepted and q.complete for q in self._ins):
            if not self.needed:
                self._completed[:] = range(self.ctx.layout.num_layers)
            self.life.advance(TransferStatus.DONE)
