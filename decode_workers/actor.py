"""The decode worker as a Ray actor: forwards calls to the plain `DecodeWorker` on its step-loop thread."""

from __future__ import annotations

import asyncio

import ray

from splitserve.cluster.cpu_threads import limit_torch_threads, warm_native_kernels
from splitserve.cluster.worker_actor import WorkerActorBase, WorkerSpecification, build_worker
from splitserve.kv_transfer import TransferSpec
from splitserve.work import WorkRequest

from .worker import DecodeWorker


@ray.remote(max_restarts=0, max_task_retries=0)
class DecodeWorkerActor(WorkerActorBase):
    def __init__(self, spec: WorkerSpecification) -> None:
        limit_torch_threads()          # its CPU share, not every core of the node
        warm_native_kernels(spec.engine.device)     # a first-use build, before ready(), not in a step
        self.worker, self.followers = build_worker(DecodeWorker, spec)
        self.worker.start()

    async def expect(self, req: WorkRequest, spec: TransferSpec, first_token: int | None = None) -> int:
        if self.followers is None:      # no need to wait for the step in progress: its forward releases the lock
            return await asyncio.to_thread(self.worker.call_now, self.worker.expect, req, spec, first_token)
        return await asyncio.wrap_future(self.worker.call(self.worker.expect, req, spec, first_token))

    async def begin_decode(self, request_id: str, first_token: int) -> bool:
        return await asyncio.wrap_future(self.worker.call(self.worker.begin_decode, request_id, first_token))

    async def migrations_in_flight(self) -> int:
        """Live KV this worker is still sending to other decode workers (a drain waits for 0 before it ends)."""
        return await asyncio.wrap_future(self.worker.call(lambda: len(self.worker.outgoing)))

    async def migrate_out(self, request_id: str, spec: TransferSpec):
        return await asyncio.wrap_future(self.worker.call(self.worker.migrate_out, request_id, spec))

    async def submit_local(self, req: WorkRequest) -> None:
        return await asyncio.wrap_future(self.worker.call(self.worker.submit_local, req))
