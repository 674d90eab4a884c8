"""Worker pools: named groups of prefill and decode actors, each placed with a placement group.

All tensor-parallel ranks of one worker go in one STRICT_PACK placement group (one node), one actor per rank:
the worker actor in bundle 0 (rank 0) and a FollowerRankActor in bundle r (cluster/tp_ranks.py); removing the
group removes every rank. Prefill and decode pools may use different TP degrees. A worker asks for GPUs
on CUDA and CPUs on CPU, plus the node-group resource (`splitserve_prefill` / `splitserve_decode`) when the
cluster defines it, so prefill and decode land on their own node pools.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import uuid
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
    prefill_tp: int = 0               # tensor-parallel ranks per prefill worker (0: the engine's --tp)
    decode_tp: int = 0                # per decode (and colocated) worker; KV is resharded between the two

    def __post_init__(self) -> None:
        for name in ("prefill_tp", "decode_tp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
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
    tp: int = 1                       # tensor-parallel ranks (KV transfer specs name it)
    followers: list = field(default_factory=list)   # the FollowerRankActor of ranks 1..tp-1
    rank_pids: list = field(default_factory=list)   # process of each rank (rank 0 first)

    def matches(self, target: str) -> bool:
        """`splitserve drain TARGET`: a worker id, a Ray node id, or the host name of the worker's node."""
        return target in (self.worker_id, self.node_id, self.hostname)

    def describe(self) -> dict:
        return {"worker_id": self.worker_id, "role": self.role, "pid": self.pid, "node_id": self.node_id,
                "hostname": self.hostname, "alive": self.alive, "draining": self.draining, "tp": self.tp,
                "rank_pids": self.rank_pids}

    def note_ready(self, info: dict) -> None:
        self.pid, self.node_id, self.hostname = info["pid"], info["node_id"], info["hostname"]
        self.rank_pids = info.get("rank_pids", [self.pid])


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

        from splitserve.cluster.tp_ranks import FollowerRankActor
        from splitserve.decode_workers.actor import DecodeWorkerActor
        from splitserve.prefill_workers.actor import PrefillWorkerActor

        worker_id = f"{role[0]}{next(self._ids)}"
        bundle = self._bundle(role)
        tp = self.tp_of(role)
        pg = placement_group([bundle] * tp, strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=120)
        kv = KVTransferConfig(backend=self.pool_config.kv_backend, worker_id=worker_id, store_host=self.store_host,
                              store_port=self.store_port, timeout_s=self.pool_config.kv_timeout_s)
        spec = WorkerSpecification(worker_id, role, dataclasses.replace(self.engine_config, tp=tp, verbose=False), kv,
                                   tp_group=f"tp/{worker_id}/{uuid.uuid4().hex[:12]}")

        def options(rank: int, name: str) -> dict:
            return dict(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), name=name,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank))
        # ranks 1..tp-1 first: every rank loads its shard at once and they meet rank 0 in the TP group
        followers = [FollowerRankActor.options(**options(r, f"splitserve-{worker_id}-rank{r}")).remote(spec, r)
                     for r in range(1, tp)]
        spec = dataclasses.replace(spec, followers=tuple(followers))
        cls = PrefillWorkerActor if role == "prefill" else DecodeWorkerActor
        actor = cls.options(**options(0, f"splitserve-{worker_id}")).remote(spec)
        handle = WorkerHandle(worker_id, role, actor, pg, tp=tp, followers=followers)
        if wait:    # listed once loaded: a loading worker must not get requests, nor miss heartbeats and be killed
            try:
                handle.note_ready(ray.get(actor.ready.remote()))
            except BaseException:
                self.release_resources(handle)     # its actors go with their placement group
                raise
        (self.prefill if role == "prefill" else self.decode)[worker_id] = handle
        return handle

    def tp_of(self, role: str) -> int:
        pc = self.pool_config
        return (pc.prefill_tp if role == "prefill" else pc.decode_tp) or self.engine_config.tp

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
        for actor in [handle.actor, *handle.followers]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.release_resources(handle)

    def shutdown(self) -> None:
        for handle in self.all():
            try:
                self.remove_worker(handle.worker_id)
            except Exception as e:
                log.warning("removing %s: %s", handle.worker_id, e)
