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


class WorkerActorBase:
    """Mixin-free base: subclasses set `self.worker` (a StepLoop) in __init__."""

    worker = None

    async def ready(self) -> dict:
        import ray

        return {"worker_id": self.worker.worker_id, "pid": os.getpid(), "role": self.worker.role,
                "fingerprint": self.worker.engine.runner.fingerprint, "hostname": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    async def load(self):
        return await asyncio.wrap_future(self.worker.call(self.worker.load))

    async def poll_outputs(self, timeout: float = 0.5) -> list:
        if not self.worker.alive:
            raise RuntimeError(f"worker {self.worker.worker_id} step loop died: {self.worker.error!r}")
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
