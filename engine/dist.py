"""Process groups for tensor parallelism, created in one place.

A tensor-parallel group is an explicit `ProcessGroup` object (Gloo on CPU, NCCL on CUDA) formed from a TCPStore
rendezvous under its own key prefix (`tp/<name>`). No default group is initialized, so it never clashes with
kv_transfer's pair groups, which are explicit ProcessGroupGloo objects under `kvx/...` in the same store. The
collectives below call the group object's own methods: nothing here touches `torch.distributed`'s global state.

    rank 0:    store = host_store()                  # or the cluster's store
               group = new_group(store, 0, world, device, prefix="tp/worker-3")
    rank r>0:  group = join_group(f"{host}:{store.port}", r, world, device, prefix="tp/worker-3")
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, Store, TCPStore

DEFAULT_TIMEOUT_S = 60.0


def host_store(host: str = "127.0.0.1", port: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> TCPStore:
    """A rendezvous store served by this process (port 0: any free port; read it back from `.port`)."""
    return TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))


def connect_store(addr: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> TCPStore:
    """A client of the store at `host:port`."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rendezvous address must look like host:port, got {addr!r}")
    return TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))


def new_group(store: Store, rank: int, world_size: int, device: torch.device | str,
              timeout_s: float = DEFAULT_TIMEOUT_S, prefix: str = "tp") -> dist.ProcessGroup:
    """Join the `world_size`-rank group under `prefix` in `store`. Gloo blocks until every rank has joined
    (raising after timeout_s); NCCL connects lazily. `timeout_s` also bounds every collective: a rank that died
    or hangs turns into an exception on the others, never a hang."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    device = torch.device(device)
    prefixed = PrefixStore(prefix, store)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL   # absent from CPU builds

        torch.cuda.set_device(device)
        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(prefixed, rank, world_size, options)
    return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)


def join_group(addr: str, rank: int, world_size: int, device: torch.device | str,
               timeout_s: float = DEFAULT_TIMEOUT_S, prefix: str = "tp") -> dist.ProcessGroup:
    """`new_group` from a `host:port` rendezvous address (the store itself is kept alive by the group)."""
    return new_group(connect_store(addr, timeout_s), rank, world_size, device, timeout_s, prefix)


# ---- collectives on an explicit group ------------------------------------------------------------------------
def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over ranks, in place."""
    group.allreduce([tensor]).wait()
    return tensor


def broadcast(tensor: torch.Tensor, group: dist.ProcessGroup, root: int = 0) -> torch.Tensor:
    """`root`'s tensor into every rank's `tensor` (same shape and dtype everywhere), in place."""
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    group.broadcast([tensor], opts).wait()
    return tensor


def gather(tensor: torch.Tensor, group: dist.ProcessGroup, root: int = 0) -> list[torch.Tensor] | None:
    """Every rank's `tensor` (same shape everywhere), in rank order, at `root`; None on the other ranks."""
    opts = dist.GatherOptions()
    opts.rootRank = root
    is_root = group.rank() == root
    out = [[torch.empty_like(tensor) for _ in range(group.size())]] if is_root else []
    group.gather(out, [tensor], opts).wait()
    return out[0] if is_root else None


def drop_group(group: dist.ProcessGroup | None) -> None:
    """Best-effort teardown (a group whose peer died may throw on the way out)."""
    if group is None:
        return
    for method in ("abort", "shutdown"):
        fn = getattr(group, method, None)
        if fn is not None:
            try:
                fn()
                return
            except Exception:   # noqa: BLE001 - teardown of a broken group may throw anything
                return
