"""Preemption notices: watch the cloud's metadata service (or Ray's node drain) and say how long the node has.

    PreemptionWatcher (daemon thread) ── every poll_interval_s ──> source.check() ──> Notice | None
        metadata unreachable, or an answer it cannot read ──> logged (first time, then once a minute); polls on
        Notice(deadline_s) ──> on_notice(deadline_s), exactly once; the thread ends

Sources, one per cloud (`preemption_clouds.py`, `preemption_ray.py`); base URLs are configurable so tests point
them at `tests/chaos/fake_metadata.py`:

    aws    IMDSv2 token, then GET /latest/meta-data/spot/instance-action   404: none; 200: {"action","time"} (~2 min)
    gcp    GET /computeMetadata/v1/instance/preempted  TRUE/FALSE, long-polled with wait_for_change  (30 s notice)
    azure  GET /metadata/scheduledevents  an event of type Preempt for this VM, with NotBefore         (>= 30 s)
    ray    Ray's draining-node table in the GCS ({node id: deadline ms}): `ray drain-node`, the autoscaler

The deadline comes from the notice's own time when it has one, else DEFAULT_DEADLINE_S (GCP's and Azure's notice).
What to do with it is the caller's: `splitserve watch-preemption` (preemption_watch.py) drains the node through
the router, exactly as `splitserve drain $(hostname) --deadline D` does.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Protocol

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 30.0      # GCP gives 30 s; Azure Spot at least 30 s; used when a notice carries no time
MIN_DEADLINE_S = 1.0           # a notice whose time has passed (clock skew) still gets a positive deadline
WARN_EVERY_S = 60.0            # an unreachable metadata server is logged at most this often


@dataclass(frozen=True, slots=True)
class Notice:
    cloud: str
    deadline_s: float          # seconds from when the notice was seen until the node goes away
    detail: str                # what the metadata said, for the log


class MetadataError(RuntimeError):
    """The metadata service answered, but not in a way a notice can be read from."""


class NoticeSource(Protocol):
    name: str

    def check(self, wait_s: float) -> Notice | None:   # sources that block until a change set `long_polls`
        """One poll: a Notice, None when there is none, or an exception when the source cannot be read.
        `wait_s` is how long the call may block (sources that long-poll use it)."""
        ...


def deadline_until(when: datetime | float | None, now: float) -> float:
    """Seconds from `now` (epoch seconds) until `when` (aware datetime or epoch seconds); the default when None."""
    if when is None:
        return DEFAULT_DEADLINE_S
    at = when.timestamp() if isinstance(when, datetime) else float(when)
    return max(MIN_DEADLINE_S, at - now)


CLOUDS = ("aws", "gcp", "azure", "ray")


def make_source(cloud: str, base_url: str | None = None, *, request_timeout_s: float = 2.0,
                clock: Callable[[], float] = time.time, **options) -> NoticeSource:
    """The notice source of `cloud`; `base_url` None means the cloud's own metadata address."""
    if cloud == "ray":
        from .preemption_ray import RayDrainSource

        return RayDrainSource(clock=clock, **options)
    from .preemption_clouds import CLOUD_SOURCES

    if cloud not in CLOUD_SOURCES:
        raise ValueError(f"cloud must be one of {', '.join(CLOUDS)}, got {cloud!r}")
    cls = CLOUD_SOURCES[cloud]
    return cls(base_url or cls.default_base_url, request_timeout_s=request_timeout_s, clock=clock, **options)


class PreemptionWatcher(threading.Thread):
    """Polls `cloud`'s notice source and calls `on_notice(deadline_s)` once when a notice appears.

    Never raises out of its loop: an unreachable or confused metadata service is logged and polled again, and an
    exception from `on_notice` is logged. `stop()` ends it early. `notice` holds what was seen."""

    def __init__(self, cloud: str, base_url: str | None = None, poll_interval_s: float = 5.0,
                 on_notice: Callable[[float], None] | None = None, *, request_timeout_s: float = 2.0,
                 source: NoticeSource | None = None, clock: Callable[[], float] = time.time, **options) -> None:
        super().__init__(name=f"preemption-watcher-{cloud}", daemon=True)
        if on_notice is None:
            raise ValueError("on_notice is required")
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s!r}")
        self.cloud, self.poll_interval_s, self.on_notice = cloud, poll_interval_s, on_notice
        self.source = source or make_source(cloud, base_url, request_timeout_s=request_timeout_s, clock=clock,
                                            **options)
        self.notice: Notice | None = None
        self.polls = 0                 # completed polls, successful or not
        self.failures = 0              # consecutive failed polls
        self._last_warning = float("-inf")
        self._stopping = threading.Event()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                notice = self._poll_once()
                if notice is not None:
                    self._fire(notice)
                    return
                pause = self.poll_interval_s - (time.monotonic() - started)
                if self.failures == 0 and getattr(self.source, "long_polls", False):
                    pause = min(pause, 1.0)    # it already waited for a change; a short pause guards a busy loop
                self._stopping.wait(max(0.0, pause))
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                close()

    def _poll_once(self) -> Notice | None:
        try:
            notice = self.source.check(self.poll_interval_s)
        except Exception as e:         # unreachable, timed out, garbled: keep watching
            self.polls += 1
            self.failures += 1
            now = time.monotonic()
            if now - self._last_warning >= WARN_EVERY_S:
                self._last_warning = now
                log.warning("preemption watcher (%s): cannot read the notice (%d failed polls in a row): %s; "
                            "still polling every %.1f s", self.cloud, self.failures, _describe(e), self.poll_interval_s)
            return None
        self.polls += 1
        if self.failures:
            log.info("preemption watcher (%s): notice source reachable again after %d failed polls", self.cloud,
                     self.failures)
            self.failures = 0
        return notice

    def _fire(self, notice: Notice) -> None:
        self.notice = notice
        log.warning("preemption notice (%s): %s; the node goes away in %.1f s", notice.cloud, notice.detail,
                    notice.deadline_s)
        try:
            self.on_notice(notice.deadline_s)
        except Exception:
            log.exception("preemption watcher (%s): the notice handler failed", self.cloud)


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) < 300 else text[:300] + " ..."
