"""The `local` transport: both ends in one process (single-node tests, colocated prefill+decode).

Pages are copied tensor to tensor inside `layer_ready`, with the same plan, resharding and fingerprint check as
`torch_dist`, so a worker can switch transports without changing how it drives them.

    rx = local.create_receiver(spec)   ->  registers at the hub     BOOTSTRAPPING
    tx = other.create_sender(spec, src) -> meets rx, fingerprints    TRANSFERRING (both)
    tx.layer_ready(l)                   -> copies layer l's pages    rx.completed_layers() grows
    last page copied                    ->                           DONE (both)
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch

from splitserve.engine.kv_layout import KVLayout

from . import pages
from .base import KVReceiver, KVSender, KVTransferBackend
from .block_pool import BlockPool
from .config import KVTransferConfig
from .handshake import layout_info, mismatch
from .lifecycle import Lifecycle
from .messages import KVTransferError, TransferSpec, TransferStatus
from .reshard import HeadPull, pulls_from, pulls_to


class LocalHub:
    """Where the two ends of a same-process transfer find each other. One lock guards every end it knows."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.senders: dict[tuple[str, int], LocalSender] = {}
        self.receivers: dict[tuple[str, int], LocalReceiver] = {}


DEFAULT_HUB = LocalHub()


class _Stream:
    """One HeadPull between a connected sender and receiver rank."""

    def __init__(self, pull: HeadPull, tx: LocalSender, rx: LocalReceiver) -> None:
        self.pull, self.tx, self.rx = pull, tx, rx
        total = tx.layout.total_kv_heads
        self.src_heads = pull.src_slice(total, tx.layout.tp_size)
        self.dst_heads = pull.dst_slice(total, rx.layout.tp_size)
        self.sent = [0] * tx.layout.num_layers

    @property
    def complete(self) -> bool:
        return all(n == len(self.rx.needed) for n in self.sent)

    def pump(self, layer: int) -> None:
        bs = self.tx.layout.block_size
        first, end = pages.next_range(self.rx.needed, self.sent[layer],
                                      pages.ready_blocks(self.tx.spec.num_tokens, self.tx.ready[layer], bs))
        if end == first:
            return
        logical = self.rx.needed[first:end]
        data = pages.gather(self.tx.kv, layer, [self.tx.src[i] for i in logical], self.src_heads)
        pages.scatter(self.rx.kv, layer, [self.rx.table[i] for i in logical], self.dst_heads, data)
        self.sent[layer] = end
        self.rx.on_pages(layer)


class LocalSender(KVSender):
    def __init__(self, hub: LocalHub, spec: TransferSpec, kv: torch.Tensor, layout: KVLayout, model_id: str,
                 src: list[int], pool: BlockPool, timeout_s: float) -> None:
        self.hub, self.spec, self.kv, self.layout, self.src = hub, spec, kv, layout, src
        self.info = layout_info(layout, model_id)
        self.ready = [0] * layout.num_layers
        self.pulls = pulls_from(layout.total_kv_heads, spec.src.tp_size, spec.dst.tp_size, layout.tp_rank)
        self.streams: list[_Stream] = []
        self.life = Lifecycle(f"local sender {spec.key} rank {layout.tp_rank}", timeout_s, pool, src,
                              free_on_done=True, on_fail=self._on_fail, lock=hub.lock)
        if not self.pulls:
            self.life.advance(TransferStatus.DONE)   # a replica no receiver rank pulls from

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    def layer_ready(self, layer: int, tokens_ready: int | None = None) -> None:
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.layout.num_layers})")
        with self.hub.lock:
            self.ready[layer] = max(self.ready[layer], tokens_ready or self.spec.num_tokens)
            if self.life.terminal:
                return
            for s in self.streams:
                s.pump(layer)
            self.check_done()

    def check_done(self) -> None:
        if len(self.streams) == len(self.pulls) and all(s.complete for s in self.streams):
            self.life.advance(TransferStatus.DONE)

    def _on_fail(self, error: str) -> None:
        for s in self.streams:
            s.rx.life.fail(f"sender failed: {error}")

    def poll(self) -> TransferStatus:
        status = self.life.poll()
        if status.terminal:
            _forget(self.hub, self.hub.senders, (self.spec.key, self.layout.tp_rank), self)
        return status

    def abort(self, reason: str = "aborted by sender") -> None:
        self.life.fail(reason)
        self.poll()

    @property
    def error(self) -> str | None:
        return self.life.error


class LocalReceiver(KVReceiver):
    def __init__(self, hub: LocalHub, spec: TransferSpec, kv: torch.Tensor, layout: KVLayout, model_id: str,
                 table: list[int], new: list[int], pool: BlockPool, timeout_s: float) -> None:
        self.hub, self.spec, self.kv, self.layout, self.table = hub, spec, kv, layout, table
        self.info = layout_info(layout, model_id)
        self.needed = list(range(len(table) - len(new), len(table)))
        self.pulls = pulls_to(layout.total_kv_heads, spec.src.tp_size, spec.dst.tp_size, layout.tp_rank)
        self.streams: list[_Stream] = []
        self._completed: list[int] = []
        self.life = Lifecycle(f"local receiver {spec.key} rank {layout.tp_rank}", timeout_s, pool, new,
                              free_on_done=False, on_fail=self._on_fail, lock=hub.lock)

    @property
    def block_table(self) -> list[int]:
        return list(self.table)

    def completed_layers(self) -> list[int]:
        with self.hub.lock:
            return list(self._completed)

    def on_pages(self, layer: int) -> None:
        if layer not in self._completed and len(self.streams) == len(self.pulls) and all(
                s.sent[layer] == len(self.needed) for s in self.streams):
            self._completed.append(layer)
        if len(self._completed) == self.layout.num_layers:
            self.life.advance(TransferStatus.DONE)

    def _on_fail(self, error: str) -> None:
        for s in self.streams:
            s.tx.life.fail(f"receiver failed: {error}")

    def poll(self) -> TransferStatus:
        status = self.life.poll()
        if status.terminal:
            _forget(self.hub, self.hub.receivers, (self.spec.key, self.layout.tp_rank), self)
        return status

    def abort(self, reason: str = "aborted by receiver") -> None:
        self.life.fail(reason)
        self.poll()

    def transfer_seconds(self) -> float | None:
        return self.life.transfer_seconds()

    @property
    def error(self) -> str | None:
        return self.life.error


def _forget(hub: LocalHub, table: dict, key: tuple[str, int], end: object) -> None:
    with hub.lock:
        if table.get(key) is end:
            del table[key]


def _connect(tx: LocalSender, rx: LocalReceiver, pull: HeadPull) -> None:
    """Handshake + first pump, under the hub lock."""
    for end, peer in ((tx, rx), (rx, tx)):
        if end.life.terminal:
            peer.life.fail(f"peer already ended: {end.error}")
            return
    error = mismatch(tx.info, rx.info)
    if error is not None:
        tx.life.fail(error)
        rx.life.fail(error)
        return
    stream = _Stream(pull, tx, rx)
    tx.streams.append(stream)
    rx.streams.append(stream)
    for end in (tx, rx):
        if len(end.streams) == len(end.pulls):
            end.life.advance(TransferStatus.TRANSFERRING)
    for layer in range(tx.layout.num_layers):
        stream.pump(layer)
    for layer in range(tx.layout.num_layers):
        rx.on_pages(layer)
    tx.check_done()


class LocalBackend(KVTransferBackend):
    name = "local"

    def __init__(self, config: KVTransferConfig, pool: BlockPool, hub: LocalHub | None = None) -> None:
        super().__init__(config, pool)
        self.hub = hub or DEFAULT_HUB

    def create_sender(self, spec: TransferSpec, src_block_ids: Sequence[int]) -> KVSender:
        kv, layout = self._registered(spec, sending=True)
        src = self._source_blocks(spec, layout, src_block_ids)
        with self.hub.lock:
            key = (spec.key, layout.tp_rank)
            if key in self.hub.senders:
                raise KVTransferError(f"local: a sender for {spec.key} rank {layout.tp_rank} already exists")
            tx = LocalSender(self.hub, spec, kv, layout, self.config.model_id, src, self.pool,
                             spec.timeout_s or self.config.timeout_s)
            self.hub.senders[key] = tx
            for pull in tx.pulls:
                rx = self.hub.receivers.get((spec.key, pull.dst_rank))
                if rx is not None:
                    _connect(tx, rx, pull)
        return tx

    def create_receiver(self, spec: TransferSpec, cached_block_ids: Sequence[int] = ()) -> KVReceiver:
        kv, layout = self._registered(spec, sending=False)
        with self.hub.lock:
            key = (spec.key, layout.tp_rank)
            if key in self.hub.receivers:
                raise KVTransferError(f"local: a receiver for {spec.key} rank {layout.tp_rank} already exists")
            table, new = self._allocate_destination(spec, layout, cached_block_ids)
            rx = LocalReceiver(self.hub, spec, kv, layout, self.config.model_id, table, new, self.pool,
                               spec.timeout_s or self.config.timeout_s)
            self.hub.receivers[key] = rx
            for pull in rx.pulls:
                tx = self.hub.senders.get((spec.key, pull.src_rank))
                if tx is not None:
                    _connect(tx, rx, pull)
        return rx
