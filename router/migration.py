"""Draining a worker before its node goes away (preemption notice, `splitserve drain`, Ray node drain).

    drain(target, deadline) ─> mark the matching workers draining (no new work)
      decode worker D, for each of its requests r:
         deadline far enough ─> live migration:  D.migrate_out(r) ─> detached, its KV streams to D'
                                                 D'.expect(r, computed tokens, next token): one call
                                                 the stream switches to D' with no recompute
         too close, or the migration fails ─> recompute: re-placed with its committed tokens (prefill again)
      prefill worker P: gets no new prompts; the prefills it has finish (or are retried if it dies)
    the drain ends once D has sent all the live KV it migrates (within the deadline): the caller may stop D then

Tokens D produced before it detached the request are committed from the migration state, so none are lost;
updates D sends afterwards for that request are stale and dropped by the router.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from splitserve.decode_workers.worker import PENDING
from splitserve.kv_transfer import TransferSpec, WorkerSpec

log = logging.getLogger(__name__)

MIN_LIVE_MIGRATION_S = 2.0     # below this much time left, recompute instead of streaming the KV


@dataclass(slots=True)
class DrainReport:
    target: str
    workers: list[str] = field(default_factory=list)
    migrated: int = 0                  # handed over with their live KV
    recomputed: int = 0                # re-placed and prefilled again
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"target": self.target, "workers": self.workers, "migrated": self.migrated,
                "recomputed": self.recomputed, "seconds": round(self.seconds, 3)}


async def drain(router, target: str, deadline_s: float) -> DrainReport:
    started = time.monotonic()
    end = started + deadline_s
    report = DrainReport(target)
    handles = [h for h in router.pools.all() if h.alive and h.matches(target)]
    if not handles:
        raise LookupError(f"no live worker or node matches {target!r}")
    for h in handles:
        h.draining = True
        report.workers.append(h.worker_id)
        try:
            await h.actor.set_draining.remote(True)
        except Exception:   # already gone: its requests are recovered by the health path
            pass
    for h in handles:
        if h.role == "prefill":
            continue
        moving = [r for r in list(router.requests.values()) if not r.finished and r.decode == h.worker_id]
        targets = [c for c in router.decode_candidates() if c.worker_id != h.worker_id]
        dsts = spread(len(moving), targets)
        results = await asyncio.gather(*(_move(router, r, h, d, end) for r, d in zip(moving, dsts)))
        report.migrated += sum(1 for ok in results if ok)
        report.recomputed += sum(1 for ok in results if not ok)
    for h in handles:          # prefill workers: let their in-flight prompts finish, within the deadline
        while h.role == "prefill" and router.prefill_inflight(h.worker_id) and time.monotonic() < end:
            await asyncio.sleep(0.05)
    for h in handles:          # decode workers: the KV they send must land before the caller may stop them
        if h.role != "prefill":
            await _outgoing_done(h, end)
    report.seconds = time.monotonic() - started
    router.metrics.count_migration(report.migrated)
    log.info("drained %s: %s", target, report.to_dict())
    return report


async def _outgoing_done(handle, end: float) -> None:
    """Wait, within the deadline, until `handle` has sent all the live KV it is migrating: a worker removed (or a
    node gone) mid-transfer would turn those migrations into recomputes after the receiver's timeout."""
    while time.monotonic() < end:
        try:
            if not await handle.actor.migrations_in_flight.remote():
                return
        except Exception:      # gone: the receivers fail their transfers and those requests are recomputed
            return
        await asyncio.sleep(0.02)


def spread(n: int, targets: list) -> list[str | None]:
    """Destinations for `n` requests drained together: each goes to the least busy target counting the ones
    assigned before it (most free KV blocks on a tie), so one destination's link and next step do not take them
    all while another idles. None for every request when there is no target."""
    if not targets:
        return [None] * n
    load = {c.worker_id: c.active_requests for c in targets}
    free = {c.worker_id: c.free_blocks for c in targets}
    out = []
    for _ in range(n):
        wid = min(load, key=lambda w: (load[w], -free[w]))
        load[wid] += 1
        out.append(wid)
    return out


async def _move(router, req, source, dst: str | None, end: float) -> bool:
    """Move one request off `source` to `dst`; True if its live KV went over, False if it was re-placed by
    recompute (no destination, too close to the deadline, or the migration failed)."""
    if dst is not None and end - time.monotonic() >= MIN_LIVE_MIGRATION_S:
        try:
            return await asyncio.wait_for(_live(router, req, source, dst), max(0.1, end - time.monotonic()))
        except Exception as e:
            log.warning("live migration of %s failed (%s); recomputing", req.work.request_id, e)
    if req.finished:
        return True
    await router.replace(req, avoid=source.worker_id)
    return False


async def _live(router, req, source, dst_id: str) -> bool:
    rid = req.work.request_id
    if req.task is not None and not req.task.done():
        await asyncio.wait([req.task])     # still being placed: migrate once it is decoding
    attempt = req.placements               # the next placement's number
    sides = WorkerSpec(source.worker_id, source.tp), WorkerSpec(dst_id, router.pools.decode[dst_id].tp)
    spec = TransferSpec(rid, *sides, num_tokens=1, attempt=attempt,
                        timeout_s=router.config.migration_timeout_s)
    state = await source.actor.migrate_out.remote(rid, spec)
    while state == PENDING:                # its KV is still arriving on the source: ask again shortly
        await asyncio.sleep(0.02)
        state = await source.actor.migrate_out.remote(rid, spec)
    if state is None:                      # finished, or not decoding there: recompute moves it if still live
        return req.finished or req.decode != source.worker_id
    # no await between the detach and here: updates the source sent before detaching are now stale
    req.placements, req.work.attempt = attempt + 1, attempt
    outputs = state.token_ids[state.num_prompt_tokens:]
    committed = req.work.committed_token_ids
    router.commit(req, outputs[len(committed):])        # tokens D made that the router had not seen yet
    if req.finished:
        return True
    req.decode, req.prefill = dst_id, None               # from here on, D's updates for rid are stale
    work = router.work_for(req, committed_upto=state.num_computed_tokens - state.num_prompt_tokens)
    spec = TransferSpec(rid, *sides, num_tokens=state.num_computed_tokens,
                        attempt=attempt, timeout_s=router.config.migration_timeout_s)
    dst = router.pools.decode[dst_id]
    # the next token is known already: expect() takes it, so D' admits as soon as the KV is in (no begin_decode)
    await dst.actor.expect.remote(work, spec, state.token_ids[state.num_computed_tokens])
    return True
