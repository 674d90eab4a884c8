"""A tensor-parallel worker on Ray: one actor per rank, all in the worker's STRICT_PACK placement group.

    bundle 0: the worker actor (prefill / decode) = rank 0: scheduler, sampler, block manager, the step loop;
              its engine is `driver_engine` and its KV backend a `ShardedKVBackend`, both talking through
              `RayFollowers` to
    bundle r: FollowerRankActor = rank r: `FollowerRank` (its model shard) + `FollowerKV` (its KV-head shard of
              every transfer) on a `FollowerLoop` thread

    rank 0 ── submit(seq, ops, step header) ──> every follower (Ray call, returns at once; the loop runs messages
              in `seq` order: ops first, then the step, whose collectives meet rank 0's over the TP group)
    rank 0 <── take_statuses() long poll ───── terminal KV statuses; the poll failing means the rank is dead

The TP group is formed in engine/dist.py from the router's rendezvous store under the worker's own prefix. A
follower that dies fails rank 0's next collective (Gloo/NCCL error, or the group timeout for a hung rank) and its
long poll (Ray reports the actor dead), so rank 0 raises TPRankError: its step loop stops, the worker's health
checks fail, and the router treats the whole worker as dead (its placement group, with every rank, goes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import os
import threading
import time
from concurrent import futures
from pathlib import Path

import ray

from splitserve.engine import dist as tp_dist
from splitserve.engine.loader.resolve import prepare_model
from splitserve.engine.tp_engine import (FollowerRank, StepHeader, TPRankError, driver_engine, follower_runner,
                                         uniform_kv_blocks)
from splitserve.kv_transfer import create_backend

from .tp_kv import DictatedPool, EndKey, FollowerKV, KVOp, RankStatus, ShardedKVBackend
from .worker_actor import WorkerSpecification

log = logging.getLogger(__name__)

TP_TIMEOUT_S = tp_dist.DEFAULT_TIMEOUT_S    # group formation, loading skew between ranks, any one collective


def rank_config(spec: WorkerSpecification):
    """The engine config every rank of the worker uses (the same KV block count on all ranks), and the model."""
    model_dir = prepare_model(spec.engine.model, spec.engine.cache_dir, verbose=False)
    return uniform_kv_blocks(spec.engine, model_dir), model_dir


def join_tp_group(spec: WorkerSpecification, rank: int):
    config = spec.engine
    return tp_dist.join_group(f"{spec.kv.store_host}:{spec.kv.store_port}", rank, config.tp, config.device,
                              TP_TIMEOUT_S, spec.tp_group)


# ---- follower ranks ----------------------------------------------------------------------------------------------
class FollowerLoop:
    """Rank r > 0: runs rank 0's messages in order on its own thread. Plain class; FollowerRankActor wraps it."""

    def __init__(self, rank: FollowerRank, kv: FollowerKV, idle_poll_s: float = 0.005) -> None:
        self.rank, self.kv, self.idle_poll_s = rank, kv, idle_poll_s
        self._heap: list[tuple[int, list[KVOp], bytes | None]] = []
        self._next = 0
        self._cv = threading.Condition()
        self._reports: list[RankStatus] = []
        self._reported = threading.Condition()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tp-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: int, ops: list[KVOp], header: bytes | None) -> None:
        with self._cv:
            heapq.heappush(self._heap, (seq, ops, header))
            self._cv.notify()

    def take_statuses(self, timeout: float) -> list[RankStatus]:
        """Terminal KV statuses since the last call, waiting up to `timeout`; raises once the loop has died."""
        with self._reported:
            if not self._reports and self.error is None:
                self._reported.wait(timeout)
            out, self._reports = self._reports, []
        if self.error is not None and not out:
            raise RuntimeError(f"tensor-parallel rank {self.rank.group.rank()} stopped: {self.error!r}")
        return out

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _take(self):
        with self._cv:
            if not (self._heap and self._heap[0][0] == self._next) and not self._stopped:
                self._cv.wait(self.idle_poll_s)
            if self._stopped:
                raise StopIteration
            if self._heap and self._heap[0][0] == self._next:
                self._next += 1
                return heapq.heappop(self._heap)
            return None

    def _run(self) -> None:
        try:
            while True:
                try:
                    message = self._take()
                except StopIteration:
                    return
                if message is not None:
                    _, ops, header = message
                    for op in ops:
                        self.kv.apply(op)
                    if header is not None:
                        self.rank.run(StepHeader.unpack(header))
                self._report(self.kv.poll())
        except BaseException as e:   # rank 0 died mid-step (a collective failed): nothing left to serve
            log.warning("tensor-parallel follower stopped: %s", e)
            self.error = e
            self._report([])

    def _report(self, statuses: list[RankStatus]) -> None:
        if statuses or self.error is not None:
            with self._reported:
                self._reports += statuses
                self._reported.notify_all()


@ray.remote(max_restarts=0, max_task_retries=0)
class FollowerRankActor:
    """Rank `rank` of a worker: joins the TP group, loads its shard, meets rank 0, then runs its messages."""

    def __init__(self, spec: WorkerSpecification, rank: int) -> None:
        config, model_dir = rank_config(spec)
        group = join_tp_group(spec, rank)
        follower = follower_runner(config, Path(model_dir), group)
        pool = DictatedPool()
        backend = create_backend(spec.kv, pool)
        backend.register_kv_cache(follower.runner.kv_cache, follower.runner.layout)
        follower.report_ready()
        self.worker_id, self.tp_rank = spec.worker_id, rank
        self.loop = FollowerLoop(follower, FollowerKV(backend, pool, rank))
        self.loop.start()

    async def submit(self, seq: int, ops: list, header: bytes | None) -> None:
        self.loop.submit(seq, ops, header)

    async def take_statuses(self, timeout: float) -> list[RankStatus]:
        return await asyncio.to_thread(self.loop.take_statuses, timeout)

    async def ready(self) -> dict:
        return {"worker_id": self.worker_id, "rank": self.tp_rank, "pid": os.getpid()}

    async def shutdown(self) -> None:
        self.loop.stop()
        self.loop.kv.close()


# ---- rank 0 ------------------------------------------------------------------------------------------------------
class RayFollowers:
    """Rank 0's `Followers` (engine/tp_engine.py) and `RankChannel` (tp_kv.py) over follower actors."""

    def __init__(self, actors: list, long_poll_s: float = 1.0) -> None:
        self.actors = list(actors)
        self.num_followers = len(self.actors)
        self.long_poll_s = long_poll_s
        self._lock = threading.RLock()
        self._seq = 0
        self._ops: list[KVOp] = []
        self._polls = {self._long_poll(r): r for r in range(1, len(self.actors) + 1)}
        self._open: dict[EndKey, dict[int, RankStatus]] = {}
        self.dead: dict[int, str] = {}

    # -- Followers
    def send(self, header: StepHeader) -> None:
        self._submit(header.pack())

    def check(self) -> None:
        self.refresh()
        self._raise_if_dead()

    def failure(self, error: BaseException, timeout_s: float) -> TPRankError:
        deadline = time.monotonic() + 5.0   # Ray reports a killed actor within about a second
        while not self.dead and time.monotonic() < deadline:
            self.refresh(wait_s=max(0.01, deadline - time.monotonic()))
        if self.dead:
            try:
                self._raise_if_dead()
            except TPRankError as dead:
                return dead
        return TPRankError(f"tensor-parallel step failed with every rank alive ({error}); a rank that hangs fails "
                           f"the collective after {timeout_s:g}s; this worker cannot continue")

    # -- RankChannel
    def post(self, op: KVOp) -> None:
        with self._lock:
            self._ops.append(op)

    def flush(self) -> None:
        with self._lock:
            if self._ops:
                self._submit(None)

    def open(self, key: EndKey) -> None:
        with self._lock:
            self._open[key] = {}

    def verdicts(self, key: EndKey) -> dict[int, RankStatus]:
        self.refresh()
        with self._lock:
            return dict(self._open.get(key, {}))

    def close(self, key: EndKey) -> None:
        with self._lock:
            self._open.pop(key, None)

    # -- internals
    def _submit(self, header: bytes | None) -> None:
        with self._lock:
            seq, ops = self._seq, self._ops
            self._seq, self._ops = seq + 1, []
            for actor in self.actors:
                actor.submit.remote(seq, ops, header)

    def _long_poll(self, rank: int) -> futures.Future:
        # a concurrent future, not ray.get: this runs on worker threads of an asyncio actor
        return self.actors[rank - 1].take_statuses.remote(self.long_poll_s).future()

    def refresh(self, wait_s: float = 0.0) -> None:
        """Collect the followers' finished long polls (statuses, or the news that a rank died) and re-issue them;
        with wait_s, wait that long for a poll to fail (a rank that just died)."""
        with self._lock:
            if wait_s and not self.dead and self._polls:
                futures.wait(list(self._polls), timeout=wait_s, return_when=futures.FIRST_EXCEPTION)
            for fut in [f for f in self._polls if f.done()]:
                rank = self._polls.pop(fut)
                error = fut.exception()
                if error is not None:    # ActorDiedError, or the follower's loop stopped
                    self.dead[rank] = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                    continue
                for s in fut.result():
                    if s.key in self._open:
                        self._open[s.key][s.rank] = s
                self._polls[self._long_poll(rank)] = rank

    def _raise_if_dead(self) -> None:
        if self.dead:
            raise TPRankError("tensor-parallel " + ", ".join(f"rank {r} died ({why})" for r, why in
                                                              sorted(self.dead.items()))
                              + "; this worker cannot continue")

    def stop(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:   # noqa: BLE001 - already gone
                pass


@dataclasses.dataclass(slots=True)
class DriverRank:
    """What a worker actor builds for rank 0 of a TP worker (see `driver_rank`)."""
    engine: object
    followers: RayFollowers

    def attach(self, worker) -> None:
        """Make the worker's KV transfers mirror onto the follower ranks (before its loop starts)."""
        worker.kv = ShardedKVBackend(worker.kv, self.followers)


def driver_rank(spec: WorkerSpecification, **engine_kwargs) -> DriverRank | None:
    """Rank 0's engine for a `tp > 1` worker: joins the TP group its follower actors are joining, loads rank 0's
    shard and meets them. None for a single-rank worker (it builds a plain LLMEngine)."""
    if spec.engine.tp == 1:
        return None
    if len(spec.followers) != spec.engine.tp - 1:
        raise ValueError(f"worker {spec.worker_id}: tp={spec.engine.tp} needs {spec.engine.tp - 1} follower "
                         f"actors, got {len(spec.followers)}")
    config, _ = rank_config(spec)
    group = join_tp_group(spec, 0)
    followers = RayFollowers(spec.followers)
    try:
        engine = driver_engine(config, group, followers, TP_TIMEOUT_S, **engine_kwargs)
    except RuntimeError as e:
        raise (e if isinstance(e, TPRankError) else followers.failure(e, TP_TIMEOUT_S)) from e
    return DriverRank(engine, followers)
