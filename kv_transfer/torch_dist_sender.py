"""torch_dist sender: one request's KV leaving one prefill TP rank (or a draining decode rank).

    create_sender(spec, src_blocks)     pin the source blocks; watch plan/<s>/<d> per pull   BOOTSTRAPPING
    plan arrives (control thread)       fingerprint + plan check; mismatch: CAS claim := refusal, FAILED
                                        else CAS claim := accepted (+ link generation)       TRANSFERRING (all d)
    layer_ready(l, tokens)              queue the newly final pages of layer l on each accepted pull's link
    link thread                         gather K,V of those pages, send header + K + V (overlaps the next layer)
    ack/<s>/<d> = ok from every d       source blocks back to the pool at the next poll()   DONE
    FAILED (lease expired, link broke,  ABORT closes each open page stream; unanswered plans get a refusal;
      receiver nack/cancel, abort())    source blocks back to the pool at the next poll()
"""

from __future__ import annotations

import functools

from splitserve.proto.v1 import kv_transfer_pb2 as pb

from . import pages, wire
from .base import KVSender
from .handshake import mismatch
from .lifecycle import Lifecycle
from .links import AbortJob, PagesJob
from .messages import TransferSpec, TransferStatus
from .rank_context import RankContext, control_key
from .reshard import HeadPull, pulls_from


class _PullOut:
    """One HeadPull leaving here: the receiver rank's plan and how far its page stream got."""

    def __init__(self, tx: TorchDistSender, pull: HeadPull) -> None:
        ctx = tx.ctx
        self.pull = pull
        self.heads = pull.src_slice(ctx.layout.total_kv_heads, ctx.layout.tp_size)
        self.link = ctx.links.send_link(tx.spec.src.endpoint(pull.src_rank), tx.spec.dst.endpoint(pull.dst_rank))
        self.needed: list[int] = []                # logical block indices the receiver asked for
        self.src_ids: list[int] = []               # their block ids here
        self.run_start: int | None = None          # src_ids[0] when they form one run and every head is sent
        self.queued = [0] * ctx.layout.num_layers   # per layer: positions of `needed` handed to the link
        self.layers_queued = 0                      # layers whose every page was handed to the link
        self.committed = 0                          # pages gathered for sending (all layers)
        self.replied = self.accepted = self.acked = False
        self.plan_watch: int | None = None
        self.ack_watch: int | None = None
        self._spec = tx.spec

    def key(self, kind: str) -> str:
        return control_key(self._spec, kind, self.pull.src_rank, self.pull.dst_rank)

    def total_pages(self, num_layers: int) -> int:
        return len(self.needed) * num_layers


class TorchDistSender(KVSender):
    def __init__(self, ctx: RankContext, spec: TransferSpec, src: list[int], timeout_s: float) -> None:
        self.ctx, self.spec, self._src = ctx, spec, src
        layout = ctx.layout
        self.life = Lifecycle(f"sender {spec.key} rank {layout.tp_rank}", timeout_s, ctx.pool, src,
                              free_on_done=True, on_fail=self._on_fail)
        self._wire_deadline = self.life.deadline + ctx.grace_s
        self._run_bound = wire.run_size_bound(spec.request_id)
        self._fences = pages.LayerFences(ctx.kv.device, layout.num_layers)
        self._ready = [0] * layout.num_layers
        pulls = pulls_from(layout.total_kv_heads, spec.src.tp_size, spec.dst.tp_size, layout.tp_rank)
        self._outs = [_PullOut(self, p) for p in pulls]
        if not self._outs:
            self.life.advance(TransferStatus.DONE)   # a replica that no receiver rank pulls from
        for p in self._outs:
            p.plan_watch = ctx.control.watch(p.key("plan"), functools.partial(self._on_plan, p), hot=True)

    # --- the KVSender interface (caller's thread) -----------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.ctx.layout.num_layers

    def layer_ready(self, layer: int, tokens_ready: int | None = None) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        tokens = self.spec.num_tokens if tokens_ready is None else tokens_ready
        if tokens <= 0:
            raise ValueError(f"tokens_ready must be positive, got {tokens}")
        self._fences.record(layer)
        with self.life.lock:
            self._ready[layer] = max(self._ready[layer], tokens)
            if self.life.terminal:
                return
            for p in self._outs:
                if p.accepted:
                    self._pump(p, layer)

    def poll(self) -> TransferStatus:
        self.ctx.drain()
        return self.life.poll()

    def wait(self, timeout_s: float) -> TransferStatus:
        self.life.wait(timeout_s)
        return self.poll()

    def abort(self, reason: str = "aborted by sender") -> None:
        self.life.fail(reason)
        self.poll()

    @property
    def error(self) -> str | None:
        return self.life.error

    # --- pages ----------------------------------------------------------------------------------------------

    def _pump(self, p: _PullOut, layer: int) -> None:
        """Under the lock: hand the newly final pages of `layer` to the link."""
        ready = pages.ready_blocks(self.spec.num_tokens, self._ready[layer], self.ctx.layout.block_size)
        first, end = pages.next_range(p.needed, p.queued[layer], ready)
        if end > first:
            p.queued[layer] = end
            p.layers_queued += end == len(p.needed)
            last = p.layers_queued == self.num_layers      # the ack is due once these pages landed
            p.link.submit(PagesJob(make=functools.partial(self._payload, p, layer, first, end - first),
                                   on_error=self.life.fail, deadline=self._wire_deadline,
                                   size_bound=self._run_bound,
                                   on_sent=functools.partial(self.ctx.control.heat, p.ack_watch) if last else None))

    def _payload(self, p: _PullOut, layer: int, first: int, count: int, stream: object | None):
        """Link thread: the pages (K and V side by side), or None once the transfer ended (its ABORT follows).
        The gather runs outside the lock: it only reads, and blocks freed meanwhile belong to a transfer that
        failed."""
        with self.life.lock:
            if self.life.terminal:
                return None
            p.committed += count               # from here on these pages are on the wire (or the link breaks)
        self._fences.wait(layer, stream)
        view = None
        if p.run_start is not None:            # one run of blocks, every local head: a view, no copy
            view = self.ctx.run_view(layer, p.run_start + first, count)
        data = view if view is not None else pages.gather(self.ctx.kv, layer, p.src_ids[first:first + count], p.heads)
        run = pb.KVPageRun(request_id=self.spec.request_id, attempt=self.spec.attempt, layer=layer, first=first,
                           count=count, num_heads=p.pull.num_heads, payload_bytes=data.numel() * data.element_size())
        return run, data

    # --- control thread -------------------------------------------------------------------------------------

    def _check_plan(self, p: _PullOut, plan: pb.KVTransferPlan) -> str | None:
        nblocks = self.spec.num_blocks(self.ctx.layout.block_size)
        idx = list(plan.block_indices)
        if plan.request_id != self.spec.request_id or plan.attempt != self.spec.attempt:
            return f"plan is for {plan.request_id}/{plan.attempt}"
        if plan.num_tokens != self.spec.num_tokens:
            return f"receiver expects {plan.num_tokens} tokens, sender has {self.spec.num_tokens}"
        if (plan.head_start, plan.head_end, plan.receiver_tp_rank) != (
                p.pull.head_start, p.pull.head_end, p.pull.dst_rank):
            return (f"receiver rank {plan.receiver_tp_rank} asks for heads [{plan.head_start}, {plan.head_end}), "
                    f"the resharding plan says rank {p.pull.dst_rank} heads [{p.pull.head_start}, {p.pull.head_end})")
        if any(b >= nblocks for b in idx) or any(a >= b for a, b in zip(idx, idx[1:])):
            return f"plan block indices are not ascending within [0, {nblocks})"
        return None

    def _reply(self, p: _PullOut, store, reply: pb.KVTransferReply) -> bytes:
        """CAS the claim key; returns what it holds (ours, or the receiver's cancel)."""
        p.replied = True
        value = reply.SerializeToString()
        result = store.compare_set(p.key("claim"), "", value)
        if result != value:
            store.delete_key(p.key("claim"))   # the receiver's cancel marker; we are its last reader
        else:
            self.ctx.control.ring(store, self.spec.dst.endpoint(p.pull.dst_rank), p.key("claim"))
        return result

    def _on_plan(self, p: _PullOut, store, value: bytes) -> None:
        plan = pb.KVTransferPlan.FromString(value)
        with self.life.lock:
            error = self.life.error if self.life.terminal else (
                mismatch(self.ctx.info, plan.receiver) or self._check_plan(p, plan))
        if error is not None:
            self._reply(p, store, pb.KVTransferReply(accepted=False, error=error, sender=self.ctx.info))
            self.life.fail(error)
            return
        # a pull with no pages (all cached at the receiver) never touches the link, so it must not form one
        gen = p.link.generation(store, plan.link_token) if plan.block_indices else 0
        reply = pb.KVTransferReply(accepted=True, sender=self.ctx.info, link_generation=gen)
        result = self._reply(p, store, reply)
        if result != reply.SerializeToString():
            self.life.fail(f"receiver rank {p.pull.dst_rank} cancelled: {pb.KVTransferReply.FromString(result).error}")
            return
        # the receiver rings when it acks (or gives up); the watch is also heated once the last pages were sent
        p.ack_watch = self.ctx.control.watch(p.key("ack"), functools.partial(self._on_ack, p),
                                             hot=not plan.block_indices)
        with self.life.lock:
            p.needed, p.accepted = list(plan.block_indices), True
            p.src_ids = [self._src[i] for i in p.needed]
            full_heads = p.heads == slice(0, self.ctx.layout.num_kv_heads)
            p.run_start = p.src_ids[0] if p.src_ids and full_heads and pages.is_run(p.src_ids) else None
            if self.life.terminal:
                self._abort_stream(p, self.life.error or "sender failed")
                return
            for layer in range(self.num_layers):
                self._pump(p, layer)
            if all(q.accepted for q in self._outs):
                self.life.advance(TransferStatus.TRANSFERRING)

    def _on_ack(self, p: _PullOut, store, value: bytes) -> None:
        ack = pb.KVTransferAck.FromString(value)
        if not ack.ok:
            self.life.fail(f"receiver rank {p.pull.dst_rank} gave up: {ack.error}")
            return
        with self.life.lock:
            p.acked = True
            if all(q.acked for q in self._outs):
                self.life.advance(TransferStatus.DONE)

    # --- failure (any thread) -------------------------------------------------------------------------------

    def _abort_stream(self, p: _PullOut, error: str) -> None:
        """Under the lock: a stream the receiver opened must be closed, by its last page or by an ABORT."""
        if p.accepted and p.committed < p.total_pages(self.num_layers):
            p.committed = p.total_pages(self.num_layers)
            header = pb.KVPageHeader(kind=pb.KVPageHeader.ABORT, request_id=self.spec.request_id,
                                     attempt=self.spec.attempt, error=error[:120])
            p.link.submit(AbortJob(header, self._wire_deadline))

    def _on_fail(self, error: str) -> None:   # under life.lock
        for p in self._outs:
            self._abort_stream(p, error)
        self.ctx.control.submit(functools.partial(self._after_fail, error))

    def _after_fail(self, error: str, store) -> None:
        for p in self._outs:
            self.ctx.control.unwatch(p.ack_watch)
            if not p.replied:
                self.ctx.control.unwatch(p.plan_watch)
                self._reply(p, store, pb.KVTransferReply(accepted=False, error=error, sender=self.ctx.info))
