"""The cluster router: a `GenerationService` over prefill and decode pools of Ray actors.

    submit ─> validate ─> record (prompt, params, seed) ─> place ─┬─ P: D.expect ─> P.prefill ─> first token ─> D.begin_decode
                                                                  └─ D.submit_local (short / cached / colocated)
    per decode worker: poll_outputs() long poll ─> one list of TokenUpdate per step ─> commit ─> RequestLog ─> clients
    worker dead (actor error, missed heartbeats) ─> every request it held is re-placed with its committed tokens

The committed tokens are the truth: a re-placed request restarts from prompt + committed tokens with the same
seed, so it continues with exactly the tokens it would have produced, and updates from a worker that no longer
owns a request are dropped, so the client sees no gap and no repeat.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field

from splitserve.engine.tokenizer import Detokenizer, Tokenizer
from splitserve.kv_transfer import TransferSpec, WorkerSpec
from splitserve.work import TokenUpdate, WorkRequest

from .admission import AdmissionConfig, AdmissionQueue, Estimate, LatencyModel, Overloaded
from .health import WorkerHealth
from .journal import Journal, JournalError, JournalRecord, RequestIdInUse
from .journal_memory import MemoryJournal
from .metrics import Metrics
from .placement import Candidate, Placement, place
from .request_log import RequestLog, RequestLogs
from .service import GenerateRequest, LoadInfo, ModelInfo, ServiceError, TokenEvent
from .validation import validate_request

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RouterConfig:
    local_prefill_threshold: int = 32     # uncached prompt tokens under which the decode worker prefills itself
    local_prefill_backlog_s: float | None = None   # conditional disaggregation (router/placement.py); None: off
    max_placements: int = 5               # placements per request (1 + migrations/recoveries) before it fails
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    stuck_timeout_s: float = 120.0        # a live worker whose step has run this long is declared lost
    colocated: bool = False
    log_ttl_s: float = 300.0
    migration_timeout_s: float = 10.0     # deadline of one live KV migration
    replace_dead_workers: bool = True     # keep each pool at its size: a dead worker gets a successor
    replace_delay_max_s: float = 30.0     # ... once the dead worker's requests are re-placed, or after this long
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)   # TTFT/TPOT targets (off by default)


@dataclass(slots=True)
class _Request:
    work: WorkRequest
    log: RequestLog
    detok: Detokenizer
    decode: str | None = None
    prefill: str | None = None
    placements: int = 0
    started: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    finished: bool = False
    task: asyncio.Task | None = None
    prefill_on: str | None = None         # the worker computing its prompt now (prefill or, locally, decode)
    prefill_tokens: int = 0
    prefill_started: float = 0.0


class Router(WorkerHealth):
    def __init__(self, pools, tokenizer: Tokenizer, model_info: ModelInfo, config: RouterConfig,
                 eos_token_ids: tuple[int, ...] = (), metrics: Metrics | None = None,
                 journal: Journal | None = None) -> None:
        self.pools = pools
        self._tokenizer = tokenizer
        self.info = model_info
        self.model_name = model_info.name
        self.config = config
        self.metrics = metrics or Metrics(self.model_name)
        self.logs = RequestLogs(config.log_ttl_s)
        self.journal = journal or MemoryJournal(config.log_ttl_s)
        self.requests: dict[str, _Request] = {}
        self.salt = int(model_info.fingerprint, 16) & (2**63 - 1)
        self._tasks: list[asyncio.Task] = []
        self._loads: dict[str, object] = {}
        self._inflight_prefill: dict[str, int] = {}
        self._closing = False
        self._eos = frozenset(eos_token_ids)
        self.latency = LatencyModel(config.admission.alpha, config.admission.fixed_cost_seqs)
        self.admission = AdmissionQueue(config.admission)
        self._unplaced: dict[str, int] = {}   # admitted, prompt not handed to a worker yet: id -> tokens

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.recover()
        for handle in self.pools.decode.values():
            self._tasks.append(asyncio.create_task(self._poll_decode(handle)))
        self._tasks.append(asyncio.create_task(self._heartbeats()))

    def attach_worker(self, handle) -> None:
        """A decode worker added while serving starts receiving work and being polled."""
        if handle.role != "prefill":
            self._tasks.append(asyncio.create_task(self._poll_decode(handle)))

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        durable = not isinstance(self.journal, MemoryJournal)
        for req in list(self.requests.values()):
            if req.task:
                req.task.cancel()
            if not durable:     # with Redis the requests stay open: the next router resumes them and clients
                self._finish(req, "abort", error="the server is shutting down")   # resume by id + last seq
        await asyncio.to_thread(self.journal.close)

    # ---- GenerationService ----------------------------------------------------------------------------
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def model_info(self) -> ModelInfo:
        return self.info

    async def submit(self, request: GenerateRequest) -> str:
        if self._closing:
            raise ServiceError("unavailable", "the server is shutting down")
        validate_request(request, self.model_name, self.info.vocab_size, self.info.max_model_len)
        rid = request.request_id or f"req-{uuid.uuid4().hex}"
        if self.logs.get(rid) is not None:
            raise ServiceError("invalid_argument", f"request_id {rid!r} is already in use", "request_id")
        await self._admit(rid, request.prompt_token_ids)
        try:
            return await self._accept(rid, request)
        except BaseException:
            self._unplaced.pop(rid, None)
            raise

    async def _admit(self, rid: str, token_ids: list[int]) -> None:
        """Admission control (router/admission.py): wait for room under the TTFT/TPOT targets, or refuse."""
        if not self.config.admission.enabled:
            return
        self.metrics.set_admission_waiting(self.admission.num_waiting + 1)
        try:
            waited, queued = await self.admission.admit(lambda: self._estimate(token_ids), lambda: self._closing)
        except Overloaded:
            self.metrics.count_admission("rejected")
            raise
        finally:
            self.metrics.set_admission_waiting(self.admission.num_waiting)
        self.metrics.count_admission("admitted_after_wait" if queued else "admitted")
        self.metrics.observe_queue_time(waited)
        self._unplaced[rid] = len(token_ids)

    def _estimate(self, token_ids: list[int]) -> Estimate:
        decode = self._candidates(self.pools.decode)
        if not decode:
            return Estimate(None, None, True, True)      # placement waits for a decode worker anyway
        choice = self._choose(token_ids, decode)
        pending_tokens, pending = sum(self._unplaced.values()), len(self._unplaced)
        active = next(c.active_requests for c in decode if c.worker_id == choice.decode) + pending
        prefill_id = choice.prefill or choice.decode
        queued = self._inflight_prefill.get(prefill_id, 0) + pending_tokens
        return Estimate(self.latency.ttft(prefill_id, queued, len(token_ids) - choice.cached_tokens),
                        self.latency.tpot(choice.decode, active + 1), prefill_idle=queued == 0,
                        decode_idle=active == 0)

    async def _accept(self, rid: str, request: GenerateRequest) -> str:
        request_log = self.logs.create(rid)
        if request_log is None:
            raise ServiceError("invalid_argument", f"request_id {rid!r} is already in use", "request_id")
        p = request.params
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        work = WorkRequest(rid, list(request.prompt_token_ids), p, seed)
        try:        # acknowledged only once journaled: a restarted router must find every id it handed out
            await asyncio.to_thread(self.journal.create, JournalRecord.of_work(work, self.info.fingerprint))
        except JournalError as e:
            if isinstance(e, RequestIdInUse):
                request_log.append(TokenEvent(rid, 0, [], "", True, "error", error=str(e)))   # the log expires
                raise ServiceError("invalid_argument", f"request_id {rid!r} is already in use", "request_id")
            self.logs.discard(rid)      # refused, never acknowledged: the client may send the same id again
            raise ServiceError("unavailable", f"cannot record the request: {e}") from None
        req = _Request(work, request_log, Detokenizer(self._tokenizer, p.stop))
        self.requests[rid] = req
        req.task = asyncio.create_task(self._place(req))
        return rid

    def stream(self, request_id: str, after_seq: int = 0):
        request_log = self.logs.get(request_id)
        if request_log is None:
            raise ServiceError("not_found", f"no request {request_id!r} (unknown, or finished too long ago)",
                               "request_id")
        if not isinstance(after_seq, int) or after_seq < 0 or (request_log.finished and after_seq > request_log.last_seq):
            raise ServiceError("invalid_argument", f"last_seq must be in [0, {request_log.last_seq}]", "last_seq")
        return request_log.follow(after_seq)

    async def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self._finish(req, "abort")
        await self._release(req)
        return True

    def load(self) -> LoadInfo:
        loads = [l for l in self._loads.values() if l is not None]
        decode = [l for l in loads if l.role != "prefill"]
        free = sum(l.num_free_blocks for l in decode)
        total = sum(l.num_total_blocks for l in decode) or 1
        return LoadInfo(num_running=sum(l.num_running for l in loads), num_waiting=sum(l.num_waiting for l in loads),
                        kv_cache_usage=1 - free / total, num_free_blocks=free, num_total_blocks=total,
                        workers=[{"worker_id": l.worker_id, "role": l.role, "num_running": l.num_running,
                                  "num_waiting": l.num_waiting, "num_free_blocks": l.num_free_blocks,
                                  "num_total_blocks": l.num_total_blocks, "draining": l.draining,
                                  "num_migrating_out": l.num_migrating_out,
                                  "state": "ready" if l.healthy else "dead"} for l in loads])

    # ---- drain and migration (router/migration.py) ----------------------------------------------------
    async def drain(self, target: str, deadline_s: float) -> dict:
        from .migration import drain

        return (await drain(self, target, deadline_s)).to_dict()

    async def add_worker(self, role: str) -> dict:
        """Grow a pool while serving: the new worker loads its model, then starts receiving work."""
        role = "colocated" if role == "decode" and self.config.colocated else role
        handle = await asyncio.to_thread(self.pools.add_worker, role)
        self.attach_worker(handle)
        return handle.describe()

    async def remove_worker(self, worker_id: str, deadline_s: float) -> dict:
        """Shrink a pool while serving: drain the worker (its requests move), then stop it."""
        report = await self.drain(worker_id, deadline_s)
        await asyncio.to_thread(self.pools.remove_worker, worker_id)
        self._loads.pop(worker_id, None)         # GetLoad no longer lists it (with its last, stale load)
        return report

    def workers(self) -> list[dict]:
        return [h.describe() for h in self.pools.all()]

    def decode_candidates(self) -> list[Candidate]:
        return self._candidates(self.pools.decode)

    def prefill_inflight(self, worker_id: str) -> bool:
        return self._inflight_prefill.get(worker_id, 0) > 0

    def work_for(self, req: _Request, committed_upto: int) -> WorkRequest:
        w = req.work
        return WorkRequest(w.request_id, w.prompt_token_ids, w.params, w.seed,
                           list(w.committed_token_ids[:committed_upto]), w.attempt)

    async def replace(self, req: _Request, avoid: str | None = None) -> None:
        """Recompute path: drop the request where it is and place it again with its committed tokens."""
        await self._release(req)
        if not req.finished:
            req.task = asyncio.create_task(self._place(req))

    # ---- router restart -------------------------------------------------------------------------------
    async def recover(self) -> int:
        """Rebuild every unfinished journaled request (log replayed with the same seqs) and re-place it with its
        committed tokens; returns how many. A no-op for a fresh in-process journal."""
        records = await asyncio.to_thread(self.journal.unfinished)
        for rec in records:
            rid = rec.request_id
            if rec.fingerprint != self.info.fingerprint:
                self.journal.finish(rid, "error", "the served model changed while the request was in flight")
                continue
            request_log = self.logs.create(rid)
            if request_log is None:
                continue                         # already live here
            work = rec.to_work()
            req = _Request(work, request_log, Detokenizer(self._tokenizer, rec.params.stop))
            n_out = 0
            for seq, tokens in rec.events():     # same grouping, so the same seqs and text deltas
                n_out += len(tokens)
                request_log.append(TokenEvent(rid, seq, tokens, req.detok.push(tokens),
                                              num_prompt_tokens=len(work.prompt_token_ids), num_output_tokens=n_out))
            if rec.token_ids:
                req.last_token_at = time.monotonic()   # its first token was already counted
            self.requests[rid] = req
            p, last = work.params, work.committed_token_ids[-1:]
            done = (len(work.committed_token_ids) >= p.max_tokens or req.detok.stopped
                    or any((not p.ignore_eos and t in self._eos) or t in p.stop_token_ids for t in last))
            if done:                             # the old router died between the last token and its finish
                self.commit(req, [], finished=True,
                             reason="length" if len(work.committed_token_ids) >= p.max_tokens else "stop")
            else:
                self.metrics.count_recovery()
                req.task = asyncio.create_task(self._place(req))
        if records:
            log.info("recovered %d unfinished requests from the journal", len(records))
        return len(records)

    # ---- placement ------------------------------------------------------------------------------------
    def _candidates(self, handles: dict) -> list[Candidate]:
        out = []
        for h in handles.values():
            if not h.alive or h.draining or not h.pid:
                continue                         # dead, draining, or still loading
            load = self._loads.get(h.worker_id)
            active = sum(1 for r in self.requests.values() if not r.finished and r.decode == h.worker_id)
            out.append(Candidate(h.worker_id, active, self._inflight_prefill.get(h.worker_id, 0),
                                 load.num_free_blocks if load else 0,
                                 frozenset(load.prefix_hashes) if load else frozenset(),
                                 self.latency.prefill_rate(h.worker_id)))
        return out

    def _choose(self, token_ids: list[int], decode: list[Candidate]) -> Placement:
        return place(token_ids, decode, self._candidates(self.pools.prefill), self.info.block_size, self.salt,
                     self.config.local_prefill_threshold, self.config.colocated, self.config.local_prefill_backlog_s)

    async def _place(self, req: _Request) -> None:
        """Put the request (with whatever it has committed) on a decode worker, through a prefill worker if useful."""
        while not req.finished:
            if req.placements >= self.config.max_placements:
                self._finish(req, "error", error=f"request {req.work.request_id} failed after {req.placements} "
                                                 "placements (workers kept failing)")
                return
            try:
                choice = self._choose(req.work.token_ids, self._candidates(self.pools.decode))
            except LookupError:
                await asyncio.sleep(0.5)         # every decode worker is gone or draining: wait for one (waiting
                continue                         # is not a placement: a lone worker's successor may take a while)
            req.placements += 1
            req.work.attempt = req.placements - 1
            self.metrics.count_placement(choice.reason)
            if req.work.attempt:                 # re-placed after a fault: prompt + committed tokens computed again
                self.metrics.count_reprefill(len(req.work.token_ids) - choice.cached_tokens)
            req.decode, req.prefill = choice.decode, choice.prefill
            try:
                await self._run_placement(req, choice.prefill, len(req.work.token_ids) - choice.cached_tokens)
                return
            except Exception as e:               # a worker died or refused: try again elsewhere
                log.warning("placement %d of %s failed: %s", req.placements, req.work.request_id, e)
                await self._release(req)
                self._check_worker_health(req.decode, req.prefill)

    async def _run_placement(self, req: _Request, prefill_id: str | None, uncached: int) -> None:
        attempt = req.work.attempt
        d = self.pools.decode[req.decode]
        if prefill_id is None:             # the decode worker prefills: done when its first token arrives
            self._prefill_begins(req, req.decode, uncached)
            await d.actor.submit_local.remote(req.work)
            return
        p = self.pools.prefill[prefill_id]
        spec = TransferSpec(req.work.request_id, WorkerSpec(prefill_id, p.tp), WorkerSpec(req.decode, d.tp),
                            num_tokens=len(req.work.token_ids), attempt=req.work.attempt)
        self._prefill_begins(req, prefill_id, uncached)
        ok = False
        try:
            await d.actor.expect.remote(req.work, spec)
            token, hits = await p.actor.prefill.remote(req.work, spec)
            ok = True
        finally:
            self._prefill_ends(req, ok)
        if req.work.attempt != attempt:          # re-placed while this prefill ran: its token is not ours
            return
        self.commit(req, [token], num_cached=hits)
        if not req.finished:
            await d.actor.begin_decode.remote(req.work.request_id, token)
            req.prefill = None                   # from here on the request no longer depends on the prefill worker

    def _prefill_begins(self, req: _Request, worker_id: str, num_tokens: int) -> None:
        self._unplaced.pop(req.work.request_id, None)
        self._prefill_ends(req, False)
        req.prefill_on, req.prefill_tokens, req.prefill_started = worker_id, num_tokens, time.monotonic()
        self._inflight_prefill[worker_id] = self._inflight_prefill.get(worker_id, 0) + num_tokens

    def _prefill_ends(self, req: _Request, completed: bool) -> None:
        """The prompt's computation finished (`completed`: it counts towards the worker's measured rate) or was
        abandoned; admission looks again either way."""
        if req.prefill_on is None:
            return
        wid, req.prefill_on = req.prefill_on, None
        self._inflight_prefill[wid] = max(0, self._inflight_prefill.get(wid, 0) - req.prefill_tokens)
        if completed:
            self.latency.prefill_done(wid, req.prefill_tokens, req.prefill_started)
        self.admission.notify()

    async def _release(self, req: _Request) -> None:
        """Tell the workers holding the request to drop it (frees their blocks); errors mean they are gone."""
        self._prefill_ends(req, False)
        for worker_id, pool in ((req.decode, self.pools.decode), (req.prefill, self.pools.prefill)):
            handle = pool.get(worker_id) if worker_id else None
            if handle is not None and handle.alive:
                try:
                    await asyncio.wait_for(handle.actor.abort.remote(req.work.request_id), 10)
                except Exception:
                    pass

    # ---- tokens ---------------------------------------------------------------------------------------
    def commit(self, req: _Request, token_ids: list[int], finished: bool = False, reason: str | None = None,
                num_cached: int = 0) -> None:
        if req.finished or (not token_ids and not finished):
            return                     # an event carries tokens or ends the stream: seqs stay contiguous
        if req.prefill_on is not None and token_ids:
            self._prefill_ends(req, True)              # a local prefill's first token
        now = time.monotonic()
        p = req.work.params
        eos = self._eos
        kept = []
        for t in token_ids:
            kept.append(t)
            if len(req.work.committed_token_ids) + len(kept) >= p.max_tokens:
                finished, reason = True, reason or "length"
                break
            if (not p.ignore_eos and t in eos) or t in p.stop_token_ids:
                finished, reason = True, "stop"
                break
        req.work.committed_token_ids.extend(kept)
        text = req.detok.push(kept)
        if req.detok.stopped:
            finished, reason = True, "stop"
        if finished:
            text += req.detok.flush()
        n_out = len(req.work.committed_token_ids)
        if req.last_token_at is None:
            self.metrics.observe_first_token(now - req.started, len(req.work.prompt_token_ids), num_cached)
            self.metrics.count_prefix_hit_tokens(num_cached)
        else:
            self.metrics.observe_token(now - req.last_token_at, len(kept))
        req.last_token_at = now
        event = TokenEvent(req.work.request_id, 0, kept, text, finished, reason if finished else None,
                           num_prompt_tokens=len(req.work.prompt_token_ids), num_output_tokens=n_out,
                           num_cached_tokens=num_cached)
        req.log.append(event)                                       # numbers the event
        self.journal.append(req.work.request_id, kept, event.seq)  # an enqueue: the stream never waits
        if finished:
            self.journal.finish(req.work.request_id, reason or "stop")
            req.finished = True
            self._prefill_ends(req, False)
            self.admission.notify()
            self.metrics.observe_finished(reason or "stop", now - req.started)
            self.requests.pop(req.work.request_id, None)
            if reason == "stop" or reason == "length":
                asyncio.get_running_loop().create_task(self._release(req))

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        self.requests.pop(req.work.request_id, None)
        self._prefill_ends(req, False)
        self.admission.notify()
        event = TokenEvent(req.work.request_id, 0, [], req.detok.flush(), True, reason, error=error,
                           num_prompt_tokens=len(req.work.prompt_token_ids),
                           num_output_tokens=len(req.work.committed_token_ids))
        req.log.append(event)
        self.journal.append(req.work.request_id, [], event.seq)
        self.journal.finish(req.work.request_id, reason, error)
        self.metrics.observe_finished(reason, time.monotonic() - req.started)

    async def _poll_decode(self, handle) -> None:
        while handle.alive and not self._closing:
            try:
                updates: list[TokenUpdate] = await handle.actor.poll_outputs.remote(0.5)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("decode worker %s is unreachable: %s", handle.worker_id, e)
                await self._worker_lost(handle)
                return
            batch = len({u.request_id for u in updates})
            for u in updates:
                req = self.requests.get(u.request_id)
                if req is None or req.decode != handle.worker_id or u.attempt != req.work.attempt:
                    continue                     # stale: the request moved, was re-placed, or ended
                if u.error:
                    log.warning("%s on %s: %s", u.request_id, handle.worker_id, u.error)
                    req.task = asyncio.create_task(self._place(req))
                    continue
                if u.kv_bytes:
                    self.metrics.observe_kv_transfer(u.kv_bytes, u.kv_seconds)
                previous = (req.last_token_at if req.prefill_on is None and len(req.work.committed_token_ids) > 1
                            else None)      # not the gap after a prefill (it includes the KV transfer)
                self.commit(req, u.token_ids, u.finished, u.finish_reason, u.num_cached_tokens)
                if previous is not None and u.token_ids:    # a decode step's gap: time per output token
                    self.latency.token_gap(handle.worker_id, (time.monotonic() - previous) / len(u.token_ids), batch)
