"""The narrow, polled interface every transport implements (SGLang disaggregation style).

    prefill worker (sender)                               decode worker (receiver)
    -----------------------                               ------------------------
                                                          rx = backend.create_receiver(spec, cached_block_ids)
                                                               allocates blocks, sends its plan  BOOTSTRAPPING
    tx = backend.create_sender(spec, src_block_ids)
         gets the plan, checks the fingerprint ---------> handshake done                        TRANSFERRING
    for layer in model: forward(layer)
         tx.layer_ready(layer, tokens_done) ---pages----> pages land in rx.block_table (layer 0 first)
                                                          all pages in place                     DONE
    DONE <------------------------------------ack-------- (receiver's blocks now belong to the decode worker)
    source blocks returned to the sender's pool

    Either side may end FAILED (deadline, peer death, fingerprint mismatch, abort); its blocks go back to its pool.

Nothing here blocks: `create_*`, `layer_ready`, `poll` and `abort` return at once; the work runs on background
threads. `wait(timeout_s)` is for an owner with nothing else to do: it sleeps until the end turns terminal (woken
by the transport thread that made it so) instead of polling in a loop. Block pools are touched only from the
caller's thread (in `create_receiver`, `poll`, `abort`, `wait`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import torch

from splitserve.engine.kv_layout import KVLayout

from .block_pool import BlockPool
from .config import KVTransferConfig
from .messages import KVTransferError, TransferSpec, TransferStatus


def _wait_by_polling(end: KVSender | KVReceiver, timeout_s: float) -> TransferStatus:
    deadline = time.monotonic() + timeout_s
    while not (status := end.poll()).terminal and time.monotonic() < deadline:
        time.sleep(0.0005)
    return status


class KVSender(ABC):
    """One request's KV leaving this TP rank. Owns (pins) the source blocks until DONE / FAILED."""

    spec: TransferSpec

    @abstractmethod
    def layer_ready(self, layer: int, tokens_ready: int | None = None) -> None:
        """The forward pass wrote layer `layer`'s KV for positions [0, tokens_ready) (None: all of them)."""

    def all_layers_ready(self) -> None:
        """Every layer is final (migration of a running request, or prefill computed in one piece)."""
        for layer in range(self.num_layers):
            self.layer_ready(layer)

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @abstractmethod
    def poll(self) -> TransferStatus:
        """Non-blocking. Enforces the lease: past the deadline the sender turns FAILED and frees its blocks."""

    def wait(self, timeout_s: float) -> TransferStatus:
        """Block up to `timeout_s` until DONE or FAILED, then poll() (for an owner with nothing else to do)."""
        return _wait_by_polling(self, timeout_s)

    @abstractmethod
    def abort(self, reason: str = "aborted by sender") -> None: ...

    @property
    @abstractmethod
    def error(self) -> str | None: ...


class KVReceiver(ABC):
    """One request's KV arriving at this TP rank, into blocks it allocated at creation."""

    spec: TransferSpec

    @property
    @abstractmethod
    def block_table(self) -> list[int]:
        """One block id per logical block: the cached prefix given at creation, then the allocated ones."""

    @abstractmethod
    def completed_layers(self) -> list[int]:
        """Layers whose every needed page is in place, in the order they completed."""

    @abstractmethod
    def poll(self) -> TransferStatus:
        """Non-blocking. Past the deadline the receiver turns FAILED; on FAILED its allocated blocks are freed."""

    def wait(self, timeout_s: float) -> TransferStatus:
        """Block up to `timeout_s` until DONE or FAILED, then poll() (for an owner with nothing else to do)."""
        return _wait_by_polling(self, timeout_s)

    @abstractmethod
    def abort(self, reason: str = "aborted by receiver") -> None: ...

    def transfer_seconds(self) -> float | None:
        """Once DONE or FAILED: seconds from the end of the handshake (pages may flow; with layer-wise streaming
        that is while the prefill still computes) to the end; None before, or if the backend does not time it."""
        return None

    @property
    @abstractmethod
    def error(self) -> str | None: ...


class KVTransferBackend(ABC):
    """One per worker TP rank: registers the KV tensor and makes the two ends of transfers."""

    name: ClassVar[str]

    def __init__(self, config: KVTransferConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.kv_cache: torch.Tensor | None = None
        self.layout: KVLayout | None = None

    def register_kv_cache(self, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        """The model runner's KV tensor (the same object attention writes into)."""
        if tuple(kv_cache.shape) != layout.shape:
            raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} does not match layout {layout.shape}")
        if kv_cache.dtype != layout.dtype:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} does not match layout {layout.dtype}")
        self.kv_cache, self.layout = kv_cache, layout

    def _registered(self, spec: TransferSpec, sending: bool) -> tuple[torch.Tensor, KVLayout]:
        if self.kv_cache is None or self.layout is None:
            raise KVTransferError(f"{self.name}: register_kv_cache() before creating transfers")
        side = spec.src if sending else spec.dst
        if side.worker_id != self.config.worker_id or side.tp_size != self.layout.tp_size:
            raise KVTransferError(
                f"{self.name}: spec side {side} is not this worker ({self.config.worker_id!r}, tp={self.layout.tp_size})")
        return self.kv_cache, self.layout

    def _source_blocks(self, spec: TransferSpec, layout: KVLayout, src_block_ids: Sequence[int]) -> list[int]:
        if len(src_block_ids) != spec.num_blocks(layout.block_size):
            raise ValueError(f"src_block_ids has {len(src_block_ids)} blocks; {spec.num_tokens} tokens need "
                             f"{spec.num_blocks(layout.block_size)}")
        return list(src_block_ids)

    def _allocate_destination(self, spec: TransferSpec, layout: KVLayout,
                              cached_block_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(block table, newly allocated blocks); raises BlockPoolExhausted with nothing allocated."""
        total = spec.num_blocks(layout.block_size)
        if len(cached_block_ids) > total:
            raise ValueError(f"{len(cached_block_ids)} cached blocks for a {total}-block sequence")
        new = self.pool.allocate(total - len(cached_block_ids))
        return list(cached_block_ids) + new, new

    @abstractmethod
    def create_sender(self, spec: TransferSpec, src_block_ids: Sequence[int]) -> KVSender:
        """`src_block_ids`: one block per logical block of the sequence; the sender takes them over."""

    @abstractmethod
    def create_receiver(self, spec: TransferSpec, cached_block_ids: Sequence[int] = ()) -> KVReceiver:
        """`cached_block_ids`: the leading logical blocks already here (prefix-cache hits; not sent, not freed)."""

    def reclaim(self) -> None:
        """Owner's thread: give back blocks whose release a transport thread parked (a receive that failed while
        its message was still landing in them). Every backend call does this too; a receiving (decode) worker also
        calls it once per tick, so an idle worker with no transfer left to poll does not keep them."""

    def close(self) -> None:
        """Stop background threads and drop pair links."""
