"""Worker pools: named groups of prefill and decode actors, each placed with a placement group.

All tensor-parallel ranks of one worker go in one STRICT_PACK placement group (one node); a worker asks for GPUs
on CUDA and CPUs on CPU, plus the node-group resource (`splitserve_prefill` / `splitserve_decode`) when the
cluster defines it, so prefill and decode land on their own node pools.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field

from splitserve.engine.config import EngineConfig
from splitserve.kv_transfer import KVTransferConfig

from .worker_actor import WorkerSpecification

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PoolConfig:
    num_prefill: int = 1
    num_decode: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    colocated: bool = False           # every worker does both phases (the baseline)
    kv_backend: str = "torch_dist"
    kv_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.num_decode < 1:
            raise ValueError(f"--decode-workers must be at least 1, got {self.num_decode}")
        if self.num_prefill < 0 or (self.num_prefill == 0 and not self.colocated and self.num_decode < 1):
            raise ValueError(f"--prefill-workers must be >= 0, got {self.num_prefill}")


@dataclass(slots=True)
class WorkerHandle:
    worker_id: str
    role: str
    actor: object
    placement_group: object
    pid: int = 0
    load: object = None               # last WorkerLoad
    alive: bool = True
    draining: bool = False
    node_id: str = ""
    hostname: str = ""

    def matches(self, target: str) -> bool:
        """`splitserve drain TARGET`: a worker id, a Ray node id, or the host name of the worker's node."""
        return target in (self.worker_id, self.node_id, self.hostname)

    def describe(self) -> dict:
        return {"worker_id": self.worker_id, "role": self.role, "pid": self.pid, "node_id": self.node_id,
                "hostname": self.hostname, "alive": self.alive, "draining": self.draining}

    def note_ready(self, info: dict) -> None:
        self.pid, self.node_id, self.hostname = info["pid"], info["node_id"], info["hostname"]


@dataclass
class WorkerPools:
    engine_config: EngineConfig
    pool_config: PoolConfig
    store_host: str
    store_port: int
    prefill: dict[str, WorkerHandle] = field(default_factory=dict)
    decode: dict[str, WorkerHandle] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count())
    rendezvous: object = None         # the TCPStore the workers' KV pair groups meet at (owned here)

    def start(self) -> None:
        """Create the configured workers and wait until every one has loaded its model."""
        import ray

        pc = self.pool_config
        decode_role = "colocated" if pc.colocated else "decode"
        for _ in range(pc.num_decode):
            self.add_worker(decode_role, wait=False)
        for _ in range(0 if pc.colocated else pc.num_prefill):
            self.add_worker("prefill", wait=False)
        for handle in self.all():
            handle.note_ready(ray.get(handle.actor.ready.remote()))

    def all(self) -> list[WorkerHandle]:
        return list(self.prefill.values()) + list(self.decode.values())

    def add_worker(self, role: str, wait: bool = True) -> WorkerHandle:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from splitserve.decode_workers.actor import DecodeWorkerActor
        from splitserve.prefill_workers.actor import PrefillWorkerActor

        worker_id = f"{role[0]}{next(self._ids)}"
        bundle = self._bundle(role)
        pg = placement_group([bundle] * self.engine_config.tp, strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=120)
        kv = KVTransferConfig(backend=self.pool_config.kv_backend, worker_id=worker_id, store_host=self.store_host,
                              store_port=self.store_port, timeout_s=self.pool_config.kv_timeout_s)
        spec = WorkerSpecification(worker_id, role, dataclasses.replace(self.engine_config, verbose=False), kv)
        cls = PrefillWorkerActor if role == "prefill" else DecodeWorkerActor
        options = dict(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), name=f"splitserve-{worker_id}",
                       scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
        actor = cls.options(**options).remote(spec)
        handle = WorkerHandle(worker_id, role, actor, pg)
        (self.prefill if role == "prefill" else self.decode)[worker_id] = handle
        if wait:
            handle.note_ready(ray.get(actor.ready.remote()))
        return handle

    def _bundle(self, role: str) -> dict:
        import ray

        gpu = self.engine_config.device.startswith("cuda")
        bundle = {"GPU": self.pool_config.gpus_per_worker} if gpu else {"CPU": self.pool_config.cpus_per_worker}
        node_resource = {"prefill": "splitserve_prefill", "decode": "splitserve_decode"}.get(role)
        if node_resource and ray.cluster_resources().get(node_resource, 0) > 0:
            bundle[node_resource] = 0.001
        return bundle

    def release_resources(self, handle: WorkerHandle) -> None:
        """A dead worker's placement group goes back to the cluster (the handle stays, listed as dead)."""
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(handle.placement_group)
        except Exception as e:   # already removed
            log.debug("placement group of %s: %s", handle.worker_id, e)

    def remove_worker(self, worker_id: str) -> None:
        import ray

        handle = self.prefill.pop(worker_id, None) or self.decode.pop(worker_id, None)
        if handle is None:
            raise ValueError(f"no worker {worker_id!r}")
        handle.alive = False
        try:
            ray.get(handle.actor.shutdown.remote(), timeout=10)
        except Exception:  # already dead: nothing to shut down
            pass
        ray.kill(handle.actor, no_restart=True)
        self.release_resources(handle)

    def shutdown(self) -> None:
        for handle in self.all():
            try:
                self.remove_worker(handle.worker_id)
            except Exception as e:
                log.warning("removing %s: %s", handle.worker_id, e)
