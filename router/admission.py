"""Admission control against TTFT and TPOT targets (`splitserve serve --ttft-slo-ms --tpot-slo-ms`).

    submit ─> estimate on the workers placement would pick ─┬─ within both targets, or those workers idle ─> admitted
                                                            ├─ over a target ─> waits, first come first served,
                                                            │                   re-checked as work completes
                                                            └─ waited max_queue_s ─> rejected: HTTP 429 /
                                                                gRPC RESOURCE_EXHAUSTED, with Retry-After

A request admitted into an overloaded cluster would miss its targets and push every request already running past
theirs, so it waits instead, and is refused once waiting has cost its TTFT budget: a client (or a load balancer in
front of several routers) can then go elsewhere, and the requests that were admitted keep their targets.

The estimates come from what the router itself observes, so they need nothing from the workers:
- prefill rate, per worker: prompt tokens over busy time, from each completed prefill (time since the later of
  its start and the worker's previous completion); tokens and busy time are averaged separately and divided,
  so prompts finishing in the same step (a busy time near zero) do not inflate the rate. Estimated TTFT = (tokens queued there
  + tokens admitted but not placed yet + this prompt's uncached tokens) / rate.
- time per output token, per decode worker: the gaps between a request's consecutive tokens, averaged, with the
  batch size they were seen at; adding one request scales it by (b + 1 + c) / (b + c), c = `fixed_cost_seqs`
  (a decode step's cost that does not grow with the batch, in units of one sequence's).
A worker with no measurement yet, or with nothing in flight, admits: waiting cannot make its first request faster.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .service import ServiceError


@dataclass(slots=True)
class AdmissionConfig:
    ttft_s: float | None = None           # None: no TTFT target
    tpot_s: float | None = None           # None: no TPOT target
    max_queue_s: float | None = None      # None: the TTFT target (or 5 s with only a TPOT target)
    alpha: float = 0.3                    # weight of a new sample in the running averages
    fixed_cost_seqs: float = 4.0

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "max_queue_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                flag = {"ttft_s": "--ttft-slo-ms", "tpot_s": "--tpot-slo-ms", "max_queue_s": "--max-queue-ms"}[name]
                raise ValueError(f"{flag} must be positive, got {value * 1000:g}")

    @property
    def enabled(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None

    @property
    def queue_limit_s(self) -> float:
        return self.max_queue_s if self.max_queue_s is not None else (self.ttft_s or 5.0)


@dataclass(slots=True)
class Estimate:
    """What admitting one more request now would give, on the workers placement would choose."""
    ttft_s: float | None              # None: not measured yet
    tpot_s: float | None
    prefill_idle: bool                # nothing in flight on the prefill side it would use
    decode_idle: bool                 # no request on the decode worker it would use


class Overloaded(ServiceError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__("resource_exhausted", message)
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _Average:
    value: float | None = None

    def add(self, sample: float, alpha: float) -> None:
        self.value = sample if self.value is None else (1 - alpha) * self.value + alpha * sample


@dataclass
class LatencyModel:
    """Per-worker running estimates of prefill throughput and time per output token."""
    alpha: float = 0.3
    fixed_cost_seqs: float = 4.0
    _prefill_tokens: dict[str, _Average] = field(default_factory=dict)   # per completed prompt
    _prefill_busy: dict[str, _Average] = field(default_factory=dict)     # seconds, per completed prompt
    _last_prefill_done: dict[str, float] = field(default_factory=dict)
    _tpot: dict[str, _Average] = field(default_factory=dict)             # seconds per token at batch _batch
    _batch: dict[str, _Average] = field(default_factory=dict)

    def prefill_done(self, worker_id: str, num_tokens: int, started: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        busy_since = max(started, self._last_prefill_done.get(worker_id, started))
        self._last_prefill_done[worker_id] = now
        if num_tokens > 0:
            self._prefill_tokens.setdefault(worker_id, _Average()).add(num_tokens, self.alpha)
            self._prefill_busy.setdefault(worker_id, _Average()).add(max(0.0, now - busy_since), self.alpha)

    def token_gap(self, worker_id: str, seconds_per_token: float, batch: int) -> None:
        self._tpot.setdefault(worker_id, _Average()).add(seconds_per_token, self.alpha)
        self._batch.setdefault(worker_id, _Average()).add(float(max(1, batch)), self.alpha)

    def forget(self, worker_id: str) -> None:
        for d in (self._prefill_tokens, self._prefill_busy, self._last_prefill_done, self._tpot, self._batch):
            d.pop(worker_id, None)

    def prefill_rate(self, worker_id: str) -> float | None:
        """Tokens/s, or None before a prompt with measurable busy time completed there."""
        tokens, busy = self._prefill_tokens.get(worker_id), self._prefill_busy.get(worker_id)
        if tokens is None or busy is None or busy.value is None or busy.value <= 1e-4:
            return None
        return tokens.value / busy.value

    def ttft(self, worker_id: str, queued_tokens: int, new_tokens: int) -> float | None:
        rate = self.prefill_rate(worker_id)
        return None if not rate else (queued_tokens + new_tokens) / rate

    def tpot(self, worker_id: str, batch_after: int) -> float | None:
        """Time per output token with `batch_after` requests on the worker."""
        avg, seen = self._tpot.get(worker_id), self._batch.get(worker_id)
        if avg is None or avg.value is None:
            return None
        c = self.fixed_cost_seqs
        return avg.value * (batch_after + c) / (seen.value + c)


class AdmissionQueue:
    """First come, first served: only the oldest waiting request may be admitted, so long prompts are not starved
    by short ones behind them. `estimate` is called with the request's arguments each time it is checked."""

    def __init__(self, config: AdmissionConfig, poll_s: float = 0.02) -> None:
        self.config = config
        self.poll_s = poll_s
        self._waiting: list[object] = []
        self._changed = asyncio.Event()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def notify(self) -> None:
        """Work finished somewhere: waiting requests should look again."""
        self._changed.set()

    def admissible(self, e: Estimate, waited_s: float) -> tuple[bool, str]:
        c = self.config
        if c.ttft_s is not None and not e.prefill_idle and e.ttft_s is not None and waited_s + e.ttft_s > c.ttft_s:
            return False, f"estimated time to first token {waited_s + e.ttft_s:.2f} s is over the {c.ttft_s:g} s target"
        if c.tpot_s is not None and not e.decode_idle and e.tpot_s is not None and e.tpot_s > c.tpot_s:
            return False, f"estimated time per output token {e.tpot_s * 1000:.0f} ms is over the {c.tpot_s * 1000:g} ms target"
        return True, ""

    async def admit(self, estimate, closing=lambda: False) -> tuple[float, bool]:
        """Wait until the request fits; returns (seconds waited, whether it had to wait). Raises Overloaded."""
        if not self.config.enabled:
            return 0.0, False
        start = time.monotonic()
        ticket = object()
        self._waiting.append(ticket)
        checks = 0
        try:
            while True:
                checks += 1
                waited = time.monotonic() - start
                if closing():
                    raise ServiceError("unavailable", "the server is shutting down")
                reason = "other requests are waiting ahead of it"
                if self._waiting[0] is ticket:
                    ok, why = self.admissible(estimate(), waited)
                    if ok:
                        return waited, checks > 1
                    reason = why
                if waited >= self.config.queue_limit_s:
                    raise Overloaded(f"overloaded: {reason}, and the request waited {waited:.2f} s for room "
                                     f"(limit {self.config.queue_limit_s:g} s); retry later",
                                     retry_after_s=max(1.0, self.config.queue_limit_s))
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), self.poll_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiting.remove(ticket)
            self._changed.set()
