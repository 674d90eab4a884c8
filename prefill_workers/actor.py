"""The prefill worker as a Ray actor: forwards calls to the plain `PrefillWorker` on its step-loop thread."""

from __future__ import annotations

import asyncio

import ray

from splitserve.cluster.cpu_threads import limit_torch_threads, warm_native_kernels
from splitserve.cluster.worker_actor import WorkerActorBase, WorkerSpecification, build_worker
from splitserve.kv_transfer import TransferSpec
from splitserve.work import WorkRequest

from .worker import PrefillWorker


@ray.remote(max_restarts=0, max_task_retries=0)
class PrefillWorkerActor(WorkerActorBase):
    def __init__(self, spec: WorkerSpecification) -> None:
        limit_torch_threads()          # its CPU share, not every core of the node
        warm_native_kernels(spec.engine.device)     # a first-use build, before ready(), not in a step
        self.worker, self.followers = build_worker(PrefillWorker, spec, reserve_full_prompt=True)
        self.worker.start()

    async def prefill(self, req: WorkRequest, spec: TransferSpec) -> tuple[int, int]:
        """(next token, prefix-hit tokens) once the prompt is computed; its KV streams to the decode worker."""
        inner = await asyncio.wrap_future(self.worker.call(self.worker.prefill, req, spec))
        return await asyncio.wrap_future(inner)
