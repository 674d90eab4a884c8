"""The step loop's two ways in: `call` waits for the tick in progress, `call_now` only for its locked parts."""

from __future__ import annotations

import threading

import pytest

from splitserve.step_loop import StepLoop


class _Loop(StepLoop):
    """One tick that holds the lock in its first part, then 'computes' with the lock released until told to go on."""

    def __init__(self) -> None:
        super().__init__("test-loop")
        self.in_forward = threading.Event()
        self.finish_forward = threading.Event()
        self.log: list[str] = []
        self.ticks = 0

    def tick(self) -> bool:
        if self.ticks:
            return False
        self.ticks += 1
        self.log.append("schedule")
        with self.lock_released():
            self.in_forward.set()
            assert self.finish_forward.wait(10)
        self.log.append("postprocess")
        return True


@pytest.fixture
def loop():
    lp = _Loop()
    lp.start()
    yield lp
    lp.finish_forward.set()
    lp.stop()


def test_call_now_runs_during_the_released_part_of_a_tick(loop):
    assert loop.in_forward.wait(10)
    assert loop.call_now(lambda: loop.log.append("expect") or 7) == 7     # the tick is still in its forward
    queued = loop.call(lambda: loop.log.append("abort"))                    # waits for the whole tick
    assert not queued.done()
    loop.finish_forward.set()
    queued.result(timeout=10)
    assert loop.log == ["schedule", "expect", "postprocess", "abort"]


def test_call_now_waits_for_the_locked_part(loop):
    assert loop.in_forward.wait(10)
    with loop.state_lock:                          # as if the loop were scheduling: call_now must wait
        t = threading.Thread(target=loop.call_now, args=(lambda: loop.log.append("expect"),))
        t.start()
        t.join(0.2)
        assert t.is_alive() and "expect" not in loop.log
    t.join(10)
    assert loop.log == ["schedule", "expect"]


def test_lock_released_outside_the_loop_thread_is_a_no_op():
    lp = _Loop()
    lp.finish_forward.set()
    assert lp.tick()                                # called directly (as worker tests do): nothing to release
    assert lp.log == ["schedule", "postprocess"] and not lp.state_lock.locked()


def test_call_now_propagates_errors_and_releases_the_lock(loop):
    assert loop.in_forward.wait(10)
    with pytest.raises(ValueError, match="bad"):
        loop.call_now(lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert not loop.state_lock.locked()             # the loop is still in its forward: nobody holds it
