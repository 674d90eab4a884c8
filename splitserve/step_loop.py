"""A worker's engine thread. Its engine and KV backend are touched only under `state_lock`: by this thread (which
holds it except where a tick releases it), or by a `call_now` command on its caller's thread.

    caller threads ──call(fn)──> command queue ──> loop thread: run commands, tick(), repeat
    caller threads ──call_now(fn)──> runs on the caller's thread once it holds `state_lock`: between ticks, or
                                     while a tick has released it (`lock_released`, around the model's forward)
    loop thread ──emit(items)──> outbox ──take_outputs(timeout)──> the router's long poll

Commands return concurrent futures, so an asyncio caller (a Ray async actor) awaits them with
`asyncio.wrap_future` and never blocks its event loop.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Any, Callable

log = logging.getLogger(__name__)


class StepLoop(ABC):
    idle_wait_s = 0.005

    def __init__(self, name: str) -> None:
        self.name = name
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: list[Any] = []
        self._out_ready = threading.Condition()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-steps", daemon=True)
        self.error: BaseException | None = None
        self._busy_since: float | None = None     # when the current command or tick began; None while idle
        # the loop holds it while it runs commands and ticks; call_now() takes it on the caller's thread
        self.state_lock = threading.Lock()
        self._lock_owner: int | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def busy_s(self) -> float:
        """How long the loop has been inside its current command or tick (0 while idle): a health check that
        cannot get an answer through the loop tells a slow step (the CPU is starved) from a stuck one."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` on the loop thread; the future holds its result or exception."""
        fut: Future = Future()
        self._commands.put((fn, args, fut))
        self._wake.set()
        return fut

    def call_now(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on this (non-loop) thread as soon as the loop is between ticks or inside a part of its
        tick that released the state lock, instead of waiting for the whole tick (a step) to end."""
        with self.state_lock:
            result = fn(*args)
        self._wake.set()
        return result

    @contextlib.contextmanager
    def lock_released(self):
        """Loop thread, inside tick(): lets call_now() commands run meanwhile. Only around work that touches no
        state they change (the forward pass of an already scheduled batch). A no-op when the caller does not hold
        the lock (tick() called directly, as tests do)."""
        if self._lock_owner != threading.get_ident():
            yield
            return
        self._lock_owner = None
        self.state_lock.release()
        try:
            yield
        finally:
            self.state_lock.acquire()
            self._lock_owner = threading.get_ident()

    def emit(self, items: list[Any]) -> None:
        if items:
            with self._out_ready:
                self._outbox.extend(items)
                self._out_ready.notify_all()

    def take_outputs(self, timeout: float) -> list[Any]:
        """Everything emitted since the last call, waiting up to `timeout` for something to arrive."""
        with self._out_ready:
            if not self._outbox:
                self._out_ready.wait(timeout)
            items, self._outbox = self._outbox, []
        return items

    @abstractmethod
    def tick(self) -> bool:
        """One unit of work; False when there was nothing to do (the loop then sleeps until woken)."""

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._busy_since = time.monotonic()
                with self.state_lock:
                    self._lock_owner = threading.get_ident()
                    try:
                        self._run_commands()
                        worked = self.tick()
                    finally:
                        self._lock_owner = None
                self._busy_since = None
                if not worked:
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
        except BaseException as e:        # the worker is broken: report it through health checks
            log.exception("%s step loop died", self.name)
            self.error = e

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)
