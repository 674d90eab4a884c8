"""`EngineService`: the `GenerationService` of one in-process engine (embedded mode and the API tests).

    submit() ──command queue──> engine thread: drain queue ─> engine.step() ─> RequestLog.append(TokenEvent)
    abort()  ──command queue──┘                                                     │ call_soon_threadsafe
    stream(id, after) <─────────────────────────────────────────────────────────────┘

One background thread is the only one that touches the engine. Submissions and aborts are commands on a
thread-safe queue, drained at the top of every step. Each request's events go to its `RequestLog` (seq 1, 2, ...),
which replays missed events and then follows live ones; finished logs stay for `log_ttl_s` so Resume works.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from splitserve.engine.config import resolve_dtype
from splitserve.engine.llm_engine import LLMEngine, RequestOutput

from .metrics import Metrics
from .request_log import RequestLogs
from .service import GenerateRequest, LoadInfo, ModelInfo, ServiceError, TokenEvent
from .validation import validate_request

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Submit:
    request: GenerateRequest
    request_id: str
    submitted_at: float


@dataclass(slots=True)
class _Abort:
    request_id: str
    done: Future


@dataclass(slots=True)
class _Timing:
    submitted_at: float
    last_token_at: float | None = None
    queue_time_observed: bool = False


def default_model_name(engine: LLMEngine) -> str:
    """The served name: the GGUF file's stem or the HF directory's name."""
    if engine.config.model:
        p = Path(engine.config.model)
        return p.stem if p.is_file() else p.name
    from splitserve.engine.loader.resolve import packaged_model_path
    return packaged_model_path().stem


class EngineService:
    def __init__(self, engine: LLMEngine, model_name: str | None = None, metrics: Metrics | None = None,
                 log_ttl_s: float = 300.0, idle_poll_s: float = 0.5) -> None:
        self.engine = engine
        self.model_name = model_name or default_model_name(engine)
        self.metrics = metrics or Metrics(self.model_name)
        self.logs = RequestLogs(log_ttl_s)
        self._commands: queue.Queue = queue.Queue()
        self._timings: dict[str, _Timing] = {}   # engine thread only
        self._idle_poll_s = idle_poll_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="splitserve-engine", daemon=True)
        self._thread.start()

    # ---- GenerationService ----------------------------------------------------------------------------------
    def tokenizer(self):
        return self.engine.tokenizer

    async def submit(self, request: GenerateRequest) -> str:
        if self._stopping.is_set():
            raise ServiceError("unavailable", "the service is shutting down")
        self._validate(request)
        request_id = request.request_id or f"req-{uuid.uuid4().hex}"
        if self.logs.create(request_id) is None:
            raise ServiceError("invalid_argument", f"request_id {request_id!r} is already in use", "request_id")
        self._commands.put(_Submit(request, request_id, time.monotonic()))
        return request_id

    def stream(self, request_id: str, after_seq: int = 0):
        request_log = self.logs.get(request_id)
        if request_log is None:
            raise ServiceError("not_found", f"no request {request_id!r} (unknown, or finished too long ago)",
                               "request_id")
        if not isinstance(after_seq, int) or after_seq < 0:
            raise ServiceError("invalid_argument", f"last_seq must be >= 0, got {after_seq!r}", "last_seq")
        if request_log.finished and after_seq > request_log.last_seq:
            raise ServiceError("invalid_argument", f"last_seq {after_seq} is past the request's last event "
                               f"({request_log.last_seq})", "last_seq")
        return request_log.follow(after_seq)

    async def abort(self, request_id: str) -> bool:
        request_log = self.logs.get(request_id)
        if request_log is None or request_log.finished:
            return False
        done: Future = Future()
        self._commands.put(_Abort(request_id, done))
        return await asyncio.wrap_future(done)

    def model_info(self) -> ModelInfo:
        e = self.engine
        return ModelInfo(name=self.model_name, max_model_len=e.max_model_len, vocab_size=e.model_config.vocab_size,
                         dtype=resolve_dtype(e.config.dtype, e.config.device), block_size=e.config.block_size,
                         fingerprint=e.runner.fingerprint)

    def load(self) -> LoadInfo:
        bm, sched = self.engine.block_manager, self.engine.scheduler
        running, waiting = len(sched.running), len(sched.waiting) + self._commands.qsize()
        return LoadInfo(num_running=running, num_waiting=waiting, kv_cache_usage=bm.usage,
                        num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
                        workers=[{"worker_id": "engine-0", "role": "engine", "num_running": running,
                                  "num_waiting": waiting, "kv_cache_usage": bm.usage,
                                  "num_free_blocks": bm.num_free_blocks, "num_total_blocks": bm.num_blocks,
                                  "state": "ready" if self._thread.is_alive() else "dead"}])

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    async def close(self) -> None:
        """Stop the engine thread; unfinished requests end with an error event."""
        self._stopping.set()
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join, 30)
        if not self._thread.is_alive():      # whatever slipped in while it stopped
            self._shut_down()

    # ---- validation (caller's thread: reads only engine constants) ------------------------------------------
    def _validate(self, request: GenerateRequest) -> None:
        e = self.engine
        validate_request(request, self.model_name, e.model_config.vocab_size, e.max_model_len)
        try:        # what the context check above cannot know: this engine's KV-cache size
            e.scheduler.check_fits(len(request.prompt_token_ids), request.params.max_tokens)
        except ValueError as err:
            prompt_fits = e.block_manager.blocks_needed(len(request.prompt_token_ids) + 1) <= e.block_manager.num_blocks
            raise ServiceError("invalid_argument", str(err), "max_tokens" if prompt_fits else "prompt") from None

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        last_sweep = time.monotonic()
        while not self._stopping.is_set():
            self._drain(block=not self.engine.has_unfinished)
            if self.engine.has_unfinished:
                self._step()
            if time.monotonic() - last_sweep > 1.0:
                self.logs.expire()
                last_sweep = time.monotonic()
        self._shut_down()

    def _shut_down(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Abort) and not cmd.done.done():
                cmd.done.set_result(False)
        self._fail_all("the service shut down")

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=self._idle_poll_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while cmd is not None:
            if isinstance(cmd, _Submit):
                self._admit(cmd)
            elif isinstance(cmd, _Abort):
                cmd.done.set_result(self._abort(cmd.request_id))
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                cmd = None

    def _admit(self, cmd: _Submit) -> None:
        request_log = self.logs.get(cmd.request_id)
        if request_log is None or request_log.finished:    # aborted before it got here
            return
        try:
            self.engine.add_request(cmd.request_id, cmd.request.prompt_token_ids, cmd.request.params)
        except ValueError as e:
            request_log.append(TokenEvent(cmd.request_id, 0, [], "", True, "error", str(e)))
            return
        self._timings[cmd.request_id] = _Timing(cmd.submitted_at)

    def _abort(self, request_id: str) -> bool:
        request_log = self.logs.get(request_id)
        if request_log is None or request_log.finished:
            return False
        self.engine.abort(request_id)          # frees its KV blocks (False when it was still in our queue)
        request_log.append(TokenEvent(request_id, 0, [], "", True, "abort"))
        timing = self._timings.pop(request_id, None)
        if timing is not None:
            self.metrics.observe_finished("abort", time.monotonic() - timing.submitted_at)
        return True

    def _step(self) -> None:
        started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:     # a bug or a device fault: fail the running requests, keep serving
            log.exception("engine step failed")
            self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
            return
        now = time.monotonic()
        self._observe_queue_times(started)
        for out in outputs:
            self._publish(out, now, started)

    def _publish(self, out: RequestOutput, now: float, step_started: float) -> None:
        timing = self._timings.get(out.request_id)
        if timing is not None:
            if not timing.queue_time_observed:
                timing.queue_time_observed = True
                self.metrics.observe_queue_time(step_started - timing.submitted_at)
            if timing.last_token_at is None:
                self.metrics.observe_first_token(now - timing.submitted_at, out.num_prompt_tokens,
                                                 out.num_cached_tokens, len(out.new_token_ids))
            else:
                self.metrics.observe_token(now - timing.last_token_at, len(out.new_token_ids))
            timing.last_token_at = now
            if out.finished:
                self.metrics.observe_finished(out.finish_reason or "stop", now - timing.submitted_at)
                del self._timings[out.request_id]
        request_log = self.logs.get(out.request_id)
        if request_log is not None:
            request_log.append(TokenEvent(out.request_id, 0, list(out.new_token_ids), out.text, out.finished,
                                          out.finish_reason, None, out.num_prompt_tokens, out.num_output_tokens,
                                          out.num_cached_tokens))

    def _observe_queue_times(self, step_started: float) -> None:
        for seq in self.engine.scheduler.running:
            timing = self._timings.get(seq.request_id)
            if timing is not None and not timing.queue_time_observed and seq.first_scheduled_time is not None:
                timing.queue_time_observed = True
                self.metrics.observe_queue_time(seq.first_scheduled_time - timing.submitted_at)

    def _fail_all(self, message: str) -> None:
        for request_log in self.logs.unfinished():
            try:
                self.engine.abort(request_log.request_id)
            except Exception:
                log.exception("abort of %s failed", request_log.request_id)
            request_log.append(TokenEvent(request_log.request_id, 0, [], "", True, "error", message))
            self._timings.pop(request_log.request_id, None)
