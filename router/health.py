"""The router's worker health: heartbeats, telling a slow worker from a dead one, and what follows a loss
(re-placing the lost worker's requests, then replacing the worker).

    every heartbeat_interval_s: load() per live worker ─ ok ─> placement sees its load
                                                        └ timeout ─> ping() off the step loop ─ alive, not stuck ─> kept
                                                                                               └ otherwise ─> lost
    lost: placement group released ─> its requests re-placed with their committed tokens ─> once they are placed,
          a replacement worker starts (its model load would otherwise take the CPU that recovery needs)
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class WorkerHealth:
    """Mixed into `Router`: uses its pools, config, requests, metrics, `_loads`, `latency`, `_release`, `_place`."""

    async def _heartbeats(self) -> None:
        while not self._closing:
            for handle in self.pools.all():
                if not handle.alive or not handle.pid:
                    continue                     # dead, or still loading its model (a replacement being added)
                try:
                    self._loads[handle.worker_id] = await asyncio.wait_for(handle.actor.load.remote(),
                                                                           self.config.heartbeat_timeout_s)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    if isinstance(e, asyncio.TimeoutError) and await self._only_slow(handle):
                        continue
                    log.warning("worker %s missed its heartbeat: %s", handle.worker_id, e or type(e).__name__)
                    await self._worker_lost(handle)
            self.metrics.set_load(self.load())
            await asyncio.sleep(self.config.heartbeat_interval_s)

    def _check_worker_health(self, *worker_ids) -> None:
        for wid in worker_ids:
            handle = self.pools.decode.get(wid) or self.pools.prefill.get(wid) if wid else None
            if handle is not None and handle.alive:
                asyncio.get_running_loop().create_task(self._probe(handle))

    async def _probe(self, handle) -> None:
        try:
            await asyncio.wait_for(handle.actor.load.remote(), self.config.heartbeat_timeout_s)
        except Exception as e:
            if not (isinstance(e, asyncio.TimeoutError) and await self._only_slow(handle)):
                await self._worker_lost(handle)

    async def _only_slow(self, handle) -> bool:
        """`load` timed out. On a starved machine a step can outlast the heartbeat timeout while the worker is
        fine: it is kept if its process answers `ping` off the step loop, the loop is alive, and its current
        step has run less than `stuck_timeout_s`. A dead process or a stuck loop is lost."""
        try:
            info = await asyncio.wait_for(handle.actor.ping.remote(), self.config.heartbeat_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            return False
        slow = info["alive"] and info["busy_s"] < self.config.stuck_timeout_s
        if slow:
            log.info("worker %s is slow (step running for %.1f s), not lost", handle.worker_id, info["busy_s"])
        return slow

    async def _replace_worker(self, role: str) -> None:
        try:
            added = await self.add_worker("decode" if role == "colocated" else role)
            log.info("started %s to replace a lost %s worker", added["worker_id"], role)
        except Exception as e:   # no room in the cluster (e.g. the node is gone): the pool stays smaller
            log.warning("could not replace a lost %s worker: %s", role, e)

    async def _worker_lost(self, handle) -> None:
        if not handle.alive:
            return
        handle.alive = False
        self._loads.pop(handle.worker_id, None)
        self.latency.forget(handle.worker_id)
        await asyncio.to_thread(self.pools.release_resources, handle)
        moved = [r for r in self.requests.values() if not r.finished and handle.worker_id in (r.decode, r.prefill)]
        log.warning("worker %s lost; re-placing %d requests", handle.worker_id, len(moved))
        for req in moved:
            if req.finished or handle.worker_id not in (req.decode, req.prefill):
                continue                         # its placement task already moved it on (during an await above)
            self.metrics.count_recovery()
            if req.task is not None and not req.task.done():
                if req.prefill == handle.worker_id:
                    continue                     # its placement task sees the failure and retries by itself
                req.task.cancel()                # a placement onto the dead worker: start over
            await self._release(req)
            req.task = asyncio.create_task(self._place(req))
        if self.config.replace_dead_workers and not self._closing:
            recovering = [r.task for r in moved if r.task is not None and not r.task.done()]
            self._tasks.append(asyncio.create_task(self._replace_after(handle, recovering)))

    async def _replace_after(self, handle, recovering: list[asyncio.Task]) -> None:
        """Recovery first, then the pool's size: a replacement loading its model takes seconds of CPU that the
        re-placed requests' prefills and first steps need, so it starts once they are placed (at most
        `replace_delay_max_s` later), or at once when its pool has no live worker left to recover onto."""
        pool = self.pools.prefill if handle.role == "prefill" else self.pools.decode
        if recovering and any(h.alive and h.pid for h in pool.values()):
            await asyncio.wait(recovering, timeout=self.config.replace_delay_max_s)
        await self._replace_worker(handle.role)
