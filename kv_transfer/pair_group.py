"""Pair process groups: one two-rank group per (sender endpoint, receiver endpoint), not one global world.

A group is formed from the rendezvous store under `kvx/link/<src>-><dst>/<generation>`; the sender is rank 0.
The backend is chosen from the KV tensor's device (cuda: NCCL, cpu: Gloo), the same code path on both.

Generations come from one counter per link in the store (`store.add`), so a generation — and the rendezvous keys
under it — is used by exactly one group, ever. Only the sender draws them, at handshake time, when its link has
none yet, broke, or the receiver's plan carries a link token it has not formed with (the receiver's link is new
or broke); the reply tells the receiver which generation to form. A broken group is never reused.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, Store

log = logging.getLogger(__name__)


def link_name(src_endpoint: str, dst_endpoint: str) -> str:
    return f"kvx/link/{src_endpoint}->{dst_endpoint}"


def new_generation(store: Store, link: str) -> int:
    """A generation no group of this link has used (1, 2, ...)."""
    return int(store.add(f"{link}/gen", 1))


def new_pair_group(store: Store, link: str, generation: int, rank: int, device: torch.device,
                   timeout_s: float) -> dist.ProcessGroup:
    """Blocks until the peer joins (Gloo) or returns a lazily connected group (NCCL); raises after timeout_s."""
    prefixed = PrefixStore(f"{link}/{generation}", store)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL   # absent from CPU builds

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(prefixed, rank, 2, options)
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)


def drop_group(group: dist.ProcessGroup | None) -> None:
    """Best-effort teardown of a broken or replaced group."""
    if group is None:
        return
    for method in ("abort", "shutdown"):
        fn = getattr(group, method, None)
        if fn is not None:
            try:
                fn()
                return
            except Exception:   # noqa: BLE001 - teardown of an already broken group may throw anything
                log.debug("pair group %s() failed", method, exc_info=True)
