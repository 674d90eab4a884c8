"""The decode worker as a Ray actor: forwards calls to the plain `DecodeWorker` on its step-loop thread."""

from __future__ import annotations

import asyncio

import ray

from splitserve.cluster.worker_actor import WorkerActorBase, WorkerSpecification
from splitserve.kv_transfer import TransferSpec
from splitserve.work import WorkRequest

from .worker import DecodeWorker


@ray.remote(max_restarts=0, max_task_retries=0)
class DecodeWorkerActor(WorkerActorBase):
    def __init__(self, spec: WorkerSpecification) -> None:
        self.worker = DecodeWorker(spec.worker_id, spec.engine, spec.kv)
        self.worker.start()

    async def expect(self, req: WorkRequest, spec: TransferSpec) -> int:
        return await asyncio.wrap_future(self.worker.call(self.worker.expect, req, spec))

    async def begin_decode(self, request_id: str, first_token: int) -> bool:
        return await asyncio.wrap_future(self.worker.call(self.worker.begin_decode, request_id, first_token))

    async def migrate_out(self, request_id: str, spec: TransferSpec):
        return await asyncio.wrap_future(self.worker.call(self.worker.migrate_out, request_id, spec))

    async def submit_local(self, req: WorkRequest) -> None:
        return await asyncio.wrap_future(self.worker.call(self.worker.submit_local, req))
