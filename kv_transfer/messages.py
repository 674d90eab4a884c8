"""Typed values that cross the kv_transfer interface: status, the two sides of a transfer, errors.

A `TransferSpec` is what the router hands to both workers of one transfer (the same value on both sides); the
wire-level messages derived from it are protobuf (`proto/v1/kv_transfer.proto`), never pickle.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class TransferStatus(enum.Enum):
    """Polled by the worker's step loop; DONE and FAILED are terminal."""

    BOOTSTRAPPING = "bootstrapping"   # handshake with the peer rank(s) not finished
    TRANSFERRING = "transferring"     # handshake done with every peer rank; pages flowing
    DONE = "done"                     # receiver: every needed page is in place; sender: the receiver confirmed
    FAILED = "failed"                 # see `.error`; the transfer's blocks are back in their pool

    @property
    def terminal(self) -> bool:
        return self in (TransferStatus.DONE, TransferStatus.FAILED)


class KVTransferError(RuntimeError):
    """A transfer could not be set up (bad spec, KV cache not registered, ...)."""


def _check_name(field: str, value: str) -> None:
    if not value or len(value) > 128 or "/" in value or not value.isprintable():
        raise ValueError(f"{field} must be 1-128 printable characters without '/', got {value!r}")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One side of a transfer: a worker with all its tensor-parallel ranks."""

    worker_id: str
    tp_size: int = 1

    def __post_init__(self) -> None:
        _check_name("WorkerSpec.worker_id", self.worker_id)
        if self.tp_size <= 0:
            raise ValueError(f"WorkerSpec.tp_size must be positive, got {self.tp_size}")

    def endpoint(self, tp_rank: int) -> str:
        return f"{self.worker_id}/{tp_rank}"


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """One KV transfer of `num_tokens` positions of `request_id` from `src` to `dst`.

    `attempt` tells retries of the same request apart (their control keys must not collide); `timeout_s`
    overrides the backend's default deadline, counted on each side from the moment it creates its end.
    """

    request_id: str
    src: WorkerSpec
    dst: WorkerSpec
    num_tokens: int
    attempt: int = 0
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        _check_name("TransferSpec.request_id", self.request_id)
        if self.num_tokens <= 0:
            raise ValueError(f"TransferSpec.num_tokens must be positive, got {self.num_tokens}")
        if self.attempt < 0:
            raise ValueError(f"TransferSpec.attempt must be >= 0, got {self.attempt}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"TransferSpec.timeout_s must be positive, got {self.timeout_s}")
        if self.src.worker_id == self.dst.worker_id:
            raise ValueError(f"TransferSpec.src and dst are the same worker {self.src.worker_id!r}")

    def num_blocks(self, block_size: int) -> int:
        return math.ceil(self.num_tokens / block_size)

    @property
    def key(self) -> str:
        """Namespace of this transfer's control-plane keys."""
        return f"kvx/{self.request_id}/{self.attempt}"
