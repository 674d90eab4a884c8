"""What both worker actors share: building the worker from plain config, health, long-polled outputs.

Ray-specific code stays here and in the two thin `actor.py` modules; the workers themselves are plain classes.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

from splitserve.engine.config import EngineConfig
from splitserve.kv_transfer import KVTransferConfig


@dataclass(slots=True)
class WorkerSpecification:
    worker_id: str
    role: str                    # prefill | decode | colocated
    engine: EngineConfig
    kv: KVTransferConfig
    tp_group: str = ""           # tp > 1: the TP group's rendezvous prefix (unique per worker incarnation)
    followers: tuple = ()        # tp > 1: the FollowerRankActor handles of ranks 1..tp-1


def build_worker(worker_cls, spec: WorkerSpecification, **engine_kwargs):
    """The plain worker for `spec`; for tp > 1 rank 0's engine drives the follower actors (cluster/tp_ranks.py).
    Returns (worker, followers or None)."""
    from .tp_ranks import driver_rank

    rank0 = driver_rank(spec, **engine_kwargs)
    worker = worker_cls(spec.worker_id, spec.engine, spec.kv, engine=rank0.engine if rank0 else None)
    if rank0 is not None:
        rank0.attach(worker)
    return worker, (rank0.followers if rank0 else None)


class WorkerActorBase:
    """Mixin-free base: subclasses set `self.worker` (a StepLoop) in __init__."""

    worker = None
    followers = None             # RayFollowers of a tensor-parallel worker

    def _check_alive(self) -> None:
        """A dead step loop or a dead tensor-parallel rank makes the whole worker dead to the router."""
        if not self.worker.alive:
            raise RuntimeError(f"worker {self.worker.worker_id} step loop died: {self.worker.error!r}")
        if self.followers is not None:
            self.followers.check()

    async def ready(self) -> dict:
        import ray

        ranks = await asyncio.gather(*(a.ready.remote() for a in self.followers.actors)) if self.followers else []
        return {"worker_id": self.worker.worker_id, "pid": os.getpid(), "role": self.worker.role,
                "rank_pids": [os.getpid()] + [r["pid"] for r in ranks],
                "fingerprint": self.worker.engine.runner.fingerprint, "hostname": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    async def load(self):
        await asyncio.to_thread(self._check_alive)
        return await asyncio.wrap_future(self.worker.call(self.worker.load))

    async def ping(self) -> dict:
        """Liveness without going through the step loop: the router asks when `load` (which waits for the loop)
        times out, and keeps a worker whose process answers and whose step loop is alive and not stuck."""
        return {"alive": self.worker.alive, "busy_s": self.worker.busy_s,
                "error": repr(self.worker.error) if self.worker.error else None}

    async def poll_outputs(self, timeout: float = 0.5) -> list:
        await asyncio.to_thread(self._check_alive)
        return await asyncio.to_thread(self.worker.take_outputs, timeout)

    async def abort(self, request_id: str) -> bool:
        return await asyncio.wrap_future(self.worker.call(self.worker.abort, request_id))

    async def set_draining(self, draining: bool) -> None:
        self.worker.draining = draining

    def pid(self) -> int:
        return os.getpid()

    async def shutdown(self) -> None:
        self.worker.stop()
        self.worker.kv.close()
        if self.followers is not None:
            self.followers.stop()
