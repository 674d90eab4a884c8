"""What every torch_dist transfer end of one worker rank shares: its KV tensor, its control plane, its links."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from splitserve.engine.kv_layout import KVLayout, pair_view
from splitserve.proto.v1 import kv_transfer_pb2 as pb

from .block_pool import BlockPool
from .control_plane import ControlPlane, StoreAddress
from .messages import TransferSpec
from .pair_group import link_name
from .recv_link import RecvLink
from .send_link import SendLink


class PairLinks:
    """Cached pair links of this rank, keyed by peer endpoint; created on first use, reused across transfers."""

    def __init__(self, address: StoreAddress, device: torch.device, control: ControlPlane,
                 connect_timeout_s: float) -> None:
        self._args = (address, device, control, connect_timeout_s)
        self._lock = threading.Lock()
        self._send: dict[str, SendLink] = {}
        self._recv: dict[str, RecvLink] = {}

    def send_link(self, src_endpoint: str, dst_endpoint: str) -> SendLink:
        name = link_name(src_endpoint, dst_endpoint)
        with self._lock:
            if name not in self._send:
                self._send[name] = SendLink(name, *self._args)
            return self._send[name]

    def recv_link(self, src_endpoint: str, dst_endpoint: str) -> RecvLink:
        name = link_name(src_endpoint, dst_endpoint)
        with self._lock:
            if name not in self._recv:
                self._recv[name] = RecvLink(name, *self._args)
            return self._recv[name]

    def close(self) -> None:
        with self._lock:
            links = [*self._send.values(), *self._recv.values()]
            self._send.clear()
            self._recv.clear()
        for link in links:
            link.close()


@dataclass(slots=True)
class RankContext:
    kv: torch.Tensor
    layout: KVLayout
    info: pb.KVLayoutInfo
    control: ControlPlane
    links: PairLinks
    pool: BlockPool
    grace_s: float       # how much longer than a transfer's deadline its page stream may stay open
    parked: deque = field(default_factory=deque)   # blocks released off the owner's thread, freed by drain()
    # each layer in storage order (`pair_view`), built once: a page run is then one slice; None when the KV
    # tensor is not laid out by KVLayout.allocate (runs are then gathered and scattered by copy)
    pairs: list[torch.Tensor] | None = field(init=False)

    def __post_init__(self) -> None:
        views = [pair_view(self.kv, layer) for layer in range(self.layout.num_layers)]
        self.pairs = views if all(v.is_contiguous() for v in views) else None

    def run_view(self, layer: int, start: int, count: int) -> torch.Tensor | None:
        """Pages [start, start + count) of `layer`, every local head, as one contiguous view (or None)."""
        return None if self.pairs is None else self.pairs[layer][start:start + count]

    def drain(self) -> None:
        """Owner's thread: free blocks whose release was parked by a background thread."""
        while self.parked:
            self.pool.free(self.parked.popleft())


def control_key(spec: TransferSpec, kind: str, src_rank: int, dst_rank: int) -> str:
    """kvx/<request>/<attempt>/<plan|claim|ack>/<sender rank>/<receiver rank>"""
    return f"{spec.key}/{kind}/{src_rank}/{dst_rank}"
