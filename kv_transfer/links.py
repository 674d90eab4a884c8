"""Pair links, torch_dist's data plane: what the sending and receiving ends share.

One thread per direction and peer rank moves page messages in order (send_link.py, recv_link.py). The message
order on a link is the sender's queue order, so both sides issue matching operations in the same order (what
NCCL needs); the receiver never guesses sizes because a fixed-size header announces them (wire.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch

from splitserve.proto.v1 import kv_transfer_pb2 as pb

from . import pair_group
from .control_plane import ControlPlane, StoreAddress
from .pages import side_stream

log = logging.getLogger(__name__)

MIN_WAIT_S = 0.05


def short_error(error: BaseException | str) -> str:
    """Transport errors can be paragraphs; keep the first line."""
    text = str(error).strip().splitlines()
    return text[0][:240] if text else type(error).__name__


def wait_all(works: list, deadline: float) -> None:
    """Waits for operations posted in order on one pair link and direction. They complete in that order (one
    TCP stream or CUDA stream), so the thread blocks once, on the last; the others are then only confirmed,
    which costs microseconds instead of a sleep and a wake-up each."""
    for w in works[-1:] + works[:-1]:
        w.wait(timedelta(seconds=max(MIN_WAIT_S, deadline - time.monotonic())))


def stream_ctx(stream: object | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


@dataclass(slots=True)
class FormJob:
    generation: int


STOP = object()


@dataclass(slots=True)
class PagesJob:
    make: Callable[[object | None], tuple[pb.KVPageRun, torch.Tensor, torch.Tensor] | None]
    on_error: Callable[[str], None]
    deadline: float
    size_bound: int          # wire.run_size_bound of its run, to batch only what fits one header frame
    on_sent: Callable[[], None] | None = None   # link thread, once its pages left (the peer has them)


@dataclass(slots=True)
class AbortJob:
    header: pb.KVPageHeader
    deadline: float


class Link:
    """A pair group that may be (re)formed under a new generation; rank 0 sends, rank 1 receives."""

    def __init__(self, name: str, rank: int, address: StoreAddress, device: torch.device, control: ControlPlane,
                 connect_timeout_s: float) -> None:
        self.name, self._rank, self._address, self.device = name, rank, address, device
        self._control, self._connect_timeout_s = control, connect_timeout_s
        self.group = None
        self.formed_generation: int | None = None
        self.broken = False
        self.stream = side_stream(device)

    def _form(self, generation: int) -> bool:
        pair_group.drop_group(self.group)
        self.group, self.formed_generation = None, generation
        try:
            store = self._address.connect()
            self.group = pair_group.new_pair_group(store, self.name, generation, self._rank, self.device,
                                                   self._connect_timeout_s)
            self.broken = False
            return True
        except Exception as e:   # noqa: BLE001
            log.warning("kv_transfer: forming %s generation %d failed: %s", self.name, generation, short_error(e))
            self._mark_broken()
            return False

    def _mark_broken(self) -> None:
        self.broken = True
        pair_group.drop_group(self.group)
        self.group = None


