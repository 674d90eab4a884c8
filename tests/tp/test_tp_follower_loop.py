"""A follower rank's message loop (cluster/tp_ranks.py), without Ray or a model: rank 0's messages run in their
sequence order whatever order Ray delivers them in, and a rank whose step fails says so in its long poll."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from splitserve.cluster.tp_ranks import FollowerLoop
from splitserve.engine.tp_engine import STEP, StepHeader


class FakeRank:
    group = SimpleNamespace(rank=lambda: 1)

    def __init__(self, log: list, fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def run(self, header: StepHeader) -> None:
        if self.fail:
            raise RuntimeError("Connection reset by peer")
        self.log.append(header)


class FakeKV:
    def __init__(self, log: list) -> None:
        self.log = log

    def apply(self, op) -> None:
        self.log.append(op)

    def poll(self) -> list:
        return []


def wait_for(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_messages_run_in_sequence_order_ops_before_their_step():
    log: list = []
    loop = FollowerLoop(FakeRank(log), FakeKV(log))
    loop.start()
    step = StepHeader(STEP, 1, 3, 1)
    loop.submit(2, ["ready-after-step-1"], None)        # delivered first, runs last
    loop.submit(1, ["start-send"], step.pack())
    time.sleep(0.05)
    assert log == []                                    # message 0 has not arrived: nothing runs yet
    loop.submit(0, [], step.pack())
    wait_for(lambda: len(log) == 4)
    assert log == [step, "start-send", step, "ready-after-step-1"]
    loop.stop()


def test_a_failed_step_ends_the_loop_and_the_long_poll_says_so():
    loop = FollowerLoop(FakeRank([], fail=True), FakeKV([]))
    loop.start()
    assert loop.take_statuses(0.01) == []
    loop.submit(0, [], StepHeader(STEP, 1, 1, 1).pack())
    wait_for(lambda: loop.error is not None)
    with pytest.raises(RuntimeError, match="rank 1 stopped"):
        loop.take_statuses(1.0)
