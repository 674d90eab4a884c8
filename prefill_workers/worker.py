"""The prefill worker: batches prompts (chunked prefill), streams each layer's KV to a decode worker as soon as
the layer is computed, and returns the first token.

    prefill(req, spec) ──> engine queue (blocks for the whole prompt reserved at admission); a recovery (committed
                           tokens: its client is mid-stream, stalled) is urgent: it takes the next step's token
                           budget ahead of new prompts and of the chunks left of prompts already in progress
        step: schedule ──> before_execute: create a KV sender per newly scheduled request (pins its blocks)
              forward layer 0 ──> sender.layer_ready(0, tokens so far) ──> pages of layer 0 leave
              forward layer 1 ──> ...                                     (transfer overlaps compute)
              last chunk ──> first token sampled ──> the prefill() future resolves with it
        poll senders each tick; DONE or FAILED ──> the sender unpins the blocks (lease)

Plain Python: the Ray actor in `actor.py` only forwards calls to it.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.scheduler import ScheduledBatch
from splitserve.kv_transfer import KVSender, KVTransferConfig, TransferSpec, create_backend
from splitserve.kv_transfer.engine_pool import EngineBlockPool
from splitserve.step_loop import StepLoop
from splitserve.work import WorkerLoad, WorkRequest

log = logging.getLogger(__name__)


class PrefillWorker(StepLoop):
    role = "prefill"

    def __init__(self, worker_id: str, engine_config: EngineConfig, kv_config: KVTransferConfig,
                 engine: LLMEngine | None = None) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.engine = engine or LLMEngine(engine_config, reserve_full_prompt=True)
        self.kv = create_backend(kv_config, EngineBlockPool(self.engine.block_manager))
        self.kv.register_kv_cache(self.engine.runner.kv_cache, self.engine.runner.layout)
        self.specs: dict[str, TransferSpec] = {}
        self.results: dict[str, Future] = {}
        self.senders: dict[str, KVSender] = {}
        self._streaming: list[tuple[KVSender, int]] = []   # (sender, tokens ready after this step)
        self.draining = False

    def prefill(self, req: WorkRequest, spec: TransferSpec) -> Future:
        """Queue the prompt (+ committed tokens); the returned future yields the next token."""
        params = dataclasses.replace(req.params, seed=req.seed, max_tokens=len(req.committed_token_ids) + 1)
        seq = self.engine.add_request(req.request_id, req.prompt_token_ids, params,
                                      committed_token_ids=req.committed_token_ids)
        if req.committed_token_ids:       # a stream stalled mid-way (its decode worker died): ahead of new prompts
            scheduler = self.engine.scheduler  # and of the chunks left of prompts in progress
            scheduler.waiting.remove(seq)
            scheduler.add_urgent(seq)
        fut: Future = Future()
        self.specs[req.request_id], self.results[req.request_id] = spec, fut
        return fut

    def abort(self, request_id: str) -> bool:
        sender = self.senders.pop(request_id, None)
        if sender is not None:
            sender.abort("request aborted")
            sender.poll()
        fut = self.results.pop(request_id, None)
        self.specs.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(RuntimeError(f"request {request_id} aborted"))
        return self.engine.abort(request_id) or sender is not None

    def load(self) -> WorkerLoad:
        e = self.engine
        queued = sum(s.num_uncomputed_tokens for s in list(e.scheduler.waiting) + e.scheduler.running)
        return WorkerLoad(self.worker_id, self.role, len(e.scheduler.running), len(e.scheduler.waiting),
                          e.block_manager.num_free_blocks, e.block_manager.num_blocks, queued_prefill_tokens=queued,
                          prefix_hashes=e.block_manager.cached_prefix_hashes(),
                          prefix_hit_tokens=e.block_manager.prefix_hits, draining=self.draining, healthy=self.alive)

    # ---- the loop -------------------------------------------------------------------------------------
    def tick(self) -> bool:
        worked = False
        if self.engine.has_unfinished:
            outputs = self.engine.step(on_layer_done=self._layer_done, before_execute=self._start_senders)
            self._streaming = []
            for out in outputs:
                fut = self.results.pop(out.request_id, None)
                self.specs.pop(out.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result((out.new_token_ids[-1], out.num_cached_tokens))
            worked = True
        for rid, sender in list(self.senders.items()):
            if sender.poll().terminal:
                if sender.error:
                    log.warning("KV send of %s ended: %s", rid, sender.error)
                del self.senders[rid]
        return worked

    def _start_senders(self, batch: ScheduledBatch) -> None:
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            rid = seq.request_id
            if rid not in self.senders and rid in self.specs:
                self.engine.block_manager.pin_blocks(seq.block_table)   # released by the sender (lease)
                self.senders[rid] = self.kv.create_sender(self.specs[rid], list(seq.block_table))
                # prefix-cache hits are already final: every layer of them can go now
                if seq.num_computed_tokens:
                    for layer in range(self.engine.model_config.num_hidden_layers):
                        self.senders[rid].layer_ready(layer, seq.num_computed_tokens)
            if rid in self.senders:
                self._streaming.append((self.senders[rid], seq.num_computed_tokens + n))

    def _layer_done(self, layer: int) -> None:
        for sender, ready in self._streaming:
            sender.layer_ready(layer, ready)
