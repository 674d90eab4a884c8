"""The `torch_dist` transport: pages over pairwise torch.distributed groups (NCCL on CUDA, Gloo on CPU).

    router: TCPStore(is_master=True)  <-- every worker rank connects as a client (store_host, store_port)
    worker rank = TorchDistBackend     control plane thread (handshake through the store, protobuf)
                                       + one SendLink / RecvLink thread per peer rank (pages, raw tensors)

A pair group exists per (sender endpoint, receiver endpoint), formed on first use and cached; a dead worker
breaks only its own pairs. See torch_dist_sender.py and torch_dist_receiver.py for the two lifecycles.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Sequence

import torch

from splitserve.engine.kv_layout import KVLayout

from .base import KVReceiver, KVSender, KVTransferBackend
from .block_pool import BlockPool
from .config import KVTransferConfig
from .control_plane import ControlPlane, StoreAddress
from .handshake import layout_info
from .messages import KVTransferError, TransferSpec
from .rank_context import PairLinks, RankContext
from .torch_dist_receiver import TorchDistReceiver
from .torch_dist_sender import TorchDistSender

GRACE_S = 2.0   # a page stream may outlive its transfer's deadline by this much before the link is declared dead

# Backends still open at interpreter exit are closed first: a daemon thread that is inside a store or Gloo call
# when Python finalizes gets unwound through C++ and aborts the process ("terminate called without an active
# exception").
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_backends() -> None:
    for backend in list(_OPEN):
        backend.close()


class TorchDistBackend(KVTransferBackend):
    name = "torch_dist"

    def __init__(self, config: KVTransferConfig, pool: BlockPool) -> None:
        super().__init__(config, pool)
        if config.store_port == 0:
            raise ValueError("KVTransferConfig.store_port must name the rendezvous store (the router's) for torch_dist")
        self._address = StoreAddress(config.store_host, config.store_port, config.connect_timeout_s)
        self._ctx: RankContext | None = None
        _OPEN.add(self)

    def register_kv_cache(self, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        if self._ctx is not None:
            raise RuntimeError("torch_dist: register_kv_cache() may be called once")
        super().register_kv_cache(kv_cache, layout)
        name = f"{self.config.worker_id}/{layout.tp_rank}"
        try:
            control = ControlPlane(self._address, self.config.poll_interval_s, name)
        except ConnectionError:
            self.kv_cache = self.layout = None
            raise
        links = PairLinks(self._address, kv_cache.device, control, self.config.connect_timeout_s)
        self._ctx = RankContext(kv_cache, layout, layout_info(layout, self.config.model_id), control, links,
                                self.pool, GRACE_S)

    def _context(self, spec: TransferSpec, sending: bool) -> RankContext:
        self._registered(spec, sending)
        if self._ctx is None:
            raise KVTransferError("torch_dist: the backend was closed")
        return self._ctx

    def create_sender(self, spec: TransferSpec, src_block_ids: Sequence[int]) -> KVSender:
        ctx = self._context(spec, sending=True)
        src = self._source_blocks(spec, ctx.layout, src_block_ids)
        ctx.drain()
        return TorchDistSender(ctx, spec, src, spec.timeout_s or self.config.timeout_s)

    def create_receiver(self, spec: TransferSpec, cached_block_ids: Sequence[int] = ()) -> KVReceiver:
        ctx = self._context(spec, sending=False)
        ctx.drain()
        table, new = self._allocate_destination(spec, ctx.layout, cached_block_ids)
        return TorchDistReceiver(ctx, spec, table, new, spec.timeout_s or self.config.timeout_s)

    def reclaim(self) -> None:
        if self._ctx is not None:
            self._ctx.drain()

    def close(self) -> None:
        _OPEN.discard(self)
        if self._ctx is not None:
            self._ctx.links.close()
            self._ctx.control.close()
            self._ctx = None
