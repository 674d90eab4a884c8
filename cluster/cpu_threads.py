"""Preparing a worker actor's process for CPU work, before it reports ready: torch's intra-op thread count (its
CPU share, not the whole node), and the native CPU kernels (built here rather than in its first step).

Torch starts one intra-op thread per core. Several workers on one node each spinning that many threads
oversubscribe it: on a 2-core machine with three workers, a decode step measured ~4x slower with torch's default
than with one thread each. So each worker actor uses as many threads as the CPUs Ray reserved for it (at least 1);
a worker with no CPU reserved (a GPU worker) keeps torch's default.
"""

from __future__ import annotations


def threads_for(cpu_share: float) -> int | None:
    """The thread count for a reserved CPU share (fractions round down, at least 1); None: leave the default."""
    if not cpu_share or cpu_share <= 0:
        return None
    return max(1, int(cpu_share))


def limit_torch_threads() -> int:
    """Set torch's intra-op threads to this Ray actor's CPU share; returns the thread count in effect."""
    import ray
    import torch

    threads = threads_for(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def warm_native_kernels(device: str) -> None:
    """On CPU, build (first use on this machine: 30-60 s) or load the native kernels now. Built lazily in the first
    step instead, the build would stall the step loop past the router's heartbeat timeout and get the worker
    declared dead and killed, mid-build, again and again."""
    if device != "cpu":
        return
    from splitserve.engine.attention.cpu_kernels import native_ops

    native_ops()
