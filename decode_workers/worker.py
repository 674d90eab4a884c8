"""The decode worker: admits requests whose KV has arrived and decodes them in one continuous batch.

    expect(req, spec) ──> receiver allocates blocks (prefix hits skipped) ──> BOOTSTRAPPING/TRANSFERRING
    begin_decode(rid, tok) ─┐                                                        │ poll() each step
    (a migration passes tok  └──────── KV DONE + first token known ──> admit ──> running batch ──> step()
     to expect: one call)     first token known, KV still arriving: wait for it before the step (once per
                              request, at most one step's time), so it joins this step rather than the next one
    submit_local(req) ──> waiting queue (short or fully cached prompts: prefilled here) ──────────┘
    every step: one list of TokenUpdate for all requests ──> outbox ──> router's poll_outputs()
    receiver FAILED ──> TokenUpdate(error=...) ──> the router re-places the request
    drain: migrate_out(rid, spec) ──> detach from the batch, send its live KV to another decode worker
           (which expect()s it like a prefill) ──> the router hands the stream over, no recompute

Plain Python: the Ray actor in `actor.py` only forwards calls to it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sequence import Sequence
from splitserve.kv_transfer import (KVReceiver, KVSender, KVTransferConfig, TransferSpec, TransferStatus,
                                    create_backend)
from splitserve.kv_transfer.engine_pool import EngineBlockPool
from splitserve.step_loop import StepLoop
from splitserve.work import MigrationState, TokenUpdate, WorkerLoad, WorkRequest

log = logging.getLogger(__name__)

PENDING = "pending"        # migrate_out: the request's KV is still arriving here
# A request whose first token is known waits (once) for the rest of its KV before a step runs without it: as long
# as the last step took (missing this step costs its stream the next one, i.e. as long again), within these bounds.
HANDOVER_WAIT_MIN_S = 0.05
HANDOVER_WAIT_MAX_S = 0.25


class StaleAttemptError(ValueError):
    """A placement call that an earlier-numbered attempt of the same request made, arriving after a later one."""


@dataclass(slots=True)
class _Incoming:
    request: WorkRequest
    seq: Sequence                # holds the prefix-cache blocks matched at expect()
    receiver: KVReceiver
    first_token: int | None = None
    waited: bool = False         # the pre-step wait for its KV was spent
    cached_blocks: int = 0       # prefix-cache hits: blocks the transfer skips


class DecodeWorker(StepLoop):
    role = "decode"

    def __init__(self, worker_id: str, engine_config: EngineConfig, kv_config: KVTransferConfig,
                 engine: LLMEngine | None = None) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.engine = engine or LLMEngine(engine_config)
        self.kv = create_backend(kv_config, EngineBlockPool(self.engine.block_manager))
        self.kv.register_kv_cache(self.engine.runner.kv_cache, self.engine.runner.layout)
        self.incoming: dict[str, _Incoming] = {}
        self.attempts: dict[str, int] = {}          # request id -> placement attempt, stamped on its updates
        self.outgoing: dict[str, KVSender] = {}     # live KV of migrated requests, until the peer confirms
        self.draining = False
        self.last_step_s = 0.0                       # how long the last engine step took (bounds the handover wait)
        self.kv_arrivals: dict[str, tuple[int, float | None]] = {}   # admitted, not yet reported: (bytes, seconds)

    # ---- commands (run on the loop thread through `call`) --------------------------------------------
    def expect(self, req: WorkRequest, spec: TransferSpec, first_token: int | None = None) -> int:
        """Reserve blocks for a request's KV that a prefill worker (or, draining, a decode worker) will send;
        returns prefix-hit tokens. A migration knows the next token already: `first_token` saves begin_decode.
        Runs on the loop thread (`call`) or under the state lock during a step's forward pass (`call_now`): it
        takes free or prefix-cached blocks only, which the batch being computed does not write."""
        tokens = req.token_ids
        self.engine.scheduler.check_fits(len(tokens) + 1, req.params.max_tokens - len(req.committed_token_ids))
        self._supersede(req)
        seq = Sequence(req.request_id, tokens, req.params, num_prompt_tokens=len(req.prompt_token_ids))
        self.engine.block_manager.match_prefix(seq)
        try:
            rx = self.kv.create_receiver(spec, cached_block_ids=list(seq.block_table))
        except BaseException:
            self.engine.block_manager.free(seq)
            raise
        self.incoming[req.request_id] = _Incoming(req, seq, rx, first_token, cached_blocks=len(seq.block_table))
        self.attempts[req.request_id] = req.attempt
        return seq.num_cached_tokens

    def begin_decode(self, request_id: str, first_token: int) -> bool:
        inc = self.incoming.get(request_id)
        if inc is None:
            return False
        inc.first_token = first_token
        return True

    def submit_local(self, req: WorkRequest) -> None:
        self._supersede(req)
        self.attempts[req.request_id] = req.attempt
        self.engine.add_request(req.request_id, req.prompt_token_ids, dataclasses.replace(req.params, seed=req.seed),
                                committed_token_ids=req.committed_token_ids)

    def _supersede(self, req: WorkRequest) -> None:
        """A placement of a request this worker still holds under an earlier attempt: the router re-placed it while
        the earlier placement's call was still in flight (a worker died mid-placement), and both chose this worker.
        The earlier one is dropped, so its blocks come back; an earlier attempt arriving after a later one is
        refused."""
        rid = req.request_id
        held = self.attempts.get(rid)
        if held is None and rid not in self.incoming:
            return
        if held is not None and held > req.attempt:
            raise StaleAttemptError(f"{rid}: placement attempt {req.attempt} arrived after attempt {held}")
        log.warning("%s: placement attempt %d replaces attempt %s held here", rid, req.attempt, held)
        self.abort(rid)

    def abort(self, request_id: str) -> bool:
        self.attempts.pop(request_id, None)
        self.kv_arrivals.pop(request_id, None)
        self._drop_outgoing(request_id, "request aborted")   # a migration the router gave up (it recomputes)
        inc = self.incoming.pop(request_id, None)
        if inc is not None:
            inc.receiver.abort("request aborted")
            inc.receiver.poll()
            self.engine.block_manager.free(inc.seq)
            return True
        return self.engine.abort(request_id)

    def migrate_out(self, request_id: str, spec: TransferSpec) -> MigrationState | str | None:
        """Stop decoding `request_id` here and start sending the KV of its computed tokens to `spec.dst`.
        Returns what the destination needs to continue; PENDING while its own KV is still arriving (ask again);
        None when it is not decoding here."""
        if request_id in self.incoming:
            return PENDING
        seq = self.engine.detach(request_id)
        if seq is None:
            return None
        self.attempts.pop(request_id, None)
        self.kv_arrivals.pop(request_id, None)
        bm = self.engine.block_manager
        computed = seq.num_computed_tokens           # the last sampled token has no KV yet: it decodes next
        blocks = seq.block_table[:bm.blocks_needed(computed)]
        spec = dataclasses.replace(spec, num_tokens=computed)
        bm.pin_blocks(blocks)                        # the sender's lease; released on DONE / FAILED / expiry
        try:
            sender = self.kv.create_sender(spec, blocks)
        except BaseException:
            bm.free_blocks(blocks)
            bm.free(seq)
            raise
        bm.free(seq)
        self._drop_outgoing(request_id, "migrated again")
        self.outgoing[request_id] = sender
        sender.all_layers_ready()
        return MigrationState(list(seq.token_ids), seq.num_prompt_tokens, computed)

    def _drop_outgoing(self, request_id: str, reason: str) -> None:
        """End a migration's sender now and unpin its blocks, instead of at the end of its lease."""
        sender = self.outgoing.pop(request_id, None)
        if sender is not None:
            sender.abort(reason)
            sender.poll()

    def _poll_outgoing(self) -> None:
        for rid, sender in list(self.outgoing.items()):
            if sender.poll().terminal:
                if sender.error:
                    log.warning("migration of %s ended: %s", rid, sender.error)
                del self.outgoing[rid]

    def load(self) -> WorkerLoad:
        e = self.engine
        return WorkerLoad(self.worker_id, self.role, len(e.scheduler.running), len(e.scheduler.waiting) + len(self.incoming),
                          e.block_manager.num_free_blocks, e.block_manager.num_blocks,
                          prefix_hit_tokens=e.block_manager.prefix_hits, num_preemptions=e.scheduler.num_preemptions,
                          draining=self.draining, healthy=self.alive, num_migrating_out=len(self.outgoing))

    # ---- the loop -------------------------------------------------------------------------------------
    def tick(self) -> bool:
        self.kv.reclaim()
        self._poll_outgoing()
        self._await_handover()
        updates = self._admit_arrived()
        outputs = []
        if self.engine.has_unfinished:
            started = time.monotonic()
            outputs = self.engine.step(around_execute=self.lock_released)   # expect() may run meanwhile
            self.last_step_s = time.monotonic() - started
        updates += [TokenUpdate(o.request_id, o.new_token_ids, o.finished, o.finish_reason,
                                num_cached_tokens=o.num_cached_tokens, attempt=self.attempts.get(o.request_id, 0),
                                **self._kv_report(o.request_id))
                    for o in outputs]
        for o in outputs:
            if o.finished:
                self.attempts.pop(o.request_id, None)
        self.emit(updates)
        return bool(outputs) or bool(self.incoming and updates)

    def _kv_report(self, request_id: str) -> dict:
        """The KV transfer of a request admitted since its last update, for the router's metrics."""
        arrival = self.kv_arrivals.pop(request_id, None) if self.kv_arrivals else None
        return {} if arrival is None else {"kv_bytes": arrival[0], "kv_seconds": arrival[1]}

    def _await_handover(self) -> None:
        """A stream stalled on its KV (first token known, pages in flight) would otherwise wait a whole step more:
        give its transfer up to one step's time to finish, once per request, before the step runs without it. The
        other streams of the batch wait that long at most once, where the stalled one would wait a whole step."""
        pending = [inc for inc in self.incoming.values() if inc.first_token is not None and not inc.waited]
        if not pending:
            return
        for inc in pending:
            inc.waited = True
        # nothing running here: waiting delays no other stream, and requests handed over together start together
        bound = (min(HANDOVER_WAIT_MAX_S, max(HANDOVER_WAIT_MIN_S, self.last_step_s))
                 if self.engine.scheduler.running else HANDOVER_WAIT_MAX_S)
        end = time.monotonic() + bound
        with self.lock_released():           # only waits on receivers: expect() may add requests meanwhile
            for inc in pending:              # woken by the transport thread, not a poll loop (torch_dist)
                inc.receiver.wait(max(0.0, end - time.monotonic()))

    def _admit_arrived(self) -> list[TokenUpdate]:
        failed: list[TokenUpdate] = []
        for rid, inc in list(self.incoming.items()):
            status = inc.receiver.poll()
            if status is TransferStatus.FAILED:
                del self.incoming[rid]
                self.engine.block_manager.free(inc.seq)
                failed.append(TokenUpdate(rid, [], error=f"KV transfer failed: {inc.receiver.error}",
                                          attempt=self.attempts.pop(rid, 0)))
            elif status is TransferStatus.DONE and inc.first_token is not None:
                del self.incoming[rid]
                req, seq = inc.request, inc.seq
                seq.block_table = list(inc.receiver.block_table)
                layout = self.engine.runner.layout
                page_bytes = layout.page_bytes * layout.total_kv_heads // layout.num_kv_heads   # every TP rank's heads
                self.kv_arrivals[rid] = ((len(seq.block_table) - inc.cached_blocks) * layout.num_layers * page_bytes,
                                         inc.receiver.transfer_seconds())
                params = dataclasses.replace(req.params, seed=req.seed)
                self.engine.add_prefilled(rid, req.token_ids, len(req.prompt_token_ids), params, req.seed, seq,
                                          inc.first_token)
        return failed
