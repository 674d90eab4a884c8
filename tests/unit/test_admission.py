"""Admission control (router/admission.py): the latency estimates and the waiting queue's decisions."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.router.admission import AdmissionConfig, AdmissionQueue, Estimate, LatencyModel, Overloaded
from splitserve.router.service import ServiceError


def test_prefill_rate_counts_busy_time_not_queueing():
    m = LatencyModel(alpha=1.0)
    m.prefill_done("p0", 1000, started=0.0, now=1.0)            # 1000 tokens in 1 s
    assert m.prefill_rate("p0") == pytest.approx(1000)
    # started at 0.5 but the worker was busy with the previous prompt until 1.0: only 1.0 -> 1.5 is its own time
    m.prefill_done("p0", 500, started=0.5, now=1.5)
    assert m.prefill_rate("p0") == pytest.approx(1000)
    assert m.ttft("p0", queued_tokens=1500, new_tokens=500) == pytest.approx(2.0)
    assert m.ttft("p1", 0, 100) is None                           # never measured


def test_prompts_finishing_in_one_step_do_not_inflate_the_prefill_rate():
    m = LatencyModel(alpha=0.5)
    m.prefill_done("p0", 0, started=0.0, now=0.0)
    m.prefill_done("p0", 500, started=0.0, now=0.00001)       # no measurable busy time yet: no rate
    assert m.prefill_rate("p0") is None
    m.prefill_done("p0", 500, started=0.0, now=1.0)            # 500 tokens in ~1 s
    m.prefill_done("p0", 500, started=0.0, now=1.0005)         # chunked prefill: done in the same step
    # the worker did 1500 tokens in ~1 s of busy time; a mean of per-prompt rates would say ~500,000 tokens/s
    assert 1000 <= m.prefill_rate("p0") <= 3000


def test_time_per_token_grows_with_the_batch():
    m = LatencyModel(alpha=1.0, fixed_cost_seqs=4.0)
    m.token_gap("d0", 0.040, batch=4)
    assert m.tpot("d0", 4) == pytest.approx(0.040)
    assert m.tpot("d0", 8) == pytest.approx(0.040 * 12 / 8)
    assert m.tpot("d0", 5) > m.tpot("d0", 4)
    m.forget("d0")
    assert m.tpot("d0", 5) is None


@pytest.mark.parametrize("kwargs,flag", [(dict(ttft_s=0), "--ttft-slo-ms"), (dict(tpot_s=-0.01), "--tpot-slo-ms"),
                                         (dict(ttft_s=1, max_queue_s=0), "--max-queue-ms")])
def test_bad_targets_are_refused_by_name(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        AdmissionConfig(**kwargs)


def run(coro):
    return asyncio.run(coro)


def test_no_targets_admits_without_estimating():
    q = AdmissionQueue(AdmissionConfig())

    def estimate():
        raise AssertionError("must not be called")

    assert run(q.admit(estimate)) == (0.0, False)


def test_within_targets_or_idle_is_admitted_at_once():
    q = AdmissionQueue(AdmissionConfig(ttft_s=0.5, tpot_s=0.05))
    assert run(q.admit(lambda: Estimate(0.2, 0.04, False, False)))[1] is False
    # far over both targets, but nothing in flight on those workers: waiting could not make it faster
    assert run(q.admit(lambda: Estimate(9.0, 1.0, True, True)))[1] is False
    # nothing measured yet
    assert run(q.admit(lambda: Estimate(None, None, False, False)))[1] is False


def test_over_target_is_refused_after_the_queue_limit_with_a_reason():
    q = AdmissionQueue(AdmissionConfig(ttft_s=0.5, max_queue_s=0.15), poll_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(Overloaded, match="time to first token") as info:
        run(q.admit(lambda: Estimate(2.0, None, False, False)))
    assert 0.15 <= time.monotonic() - t0 < 1.0
    assert info.value.kind == "resource_exhausted" and info.value.retry_after_s >= 1
    assert q.num_waiting == 0

    q = AdmissionQueue(AdmissionConfig(tpot_s=0.05, max_queue_s=0.05), poll_s=0.01)
    with pytest.raises(Overloaded, match="per output token"):
        run(q.admit(lambda: Estimate(None, 0.08, False, False)))


def test_a_waiting_request_is_admitted_when_work_drains_and_its_wait_counts_against_ttft():
    async def scenario():
        q = AdmissionQueue(AdmissionConfig(ttft_s=1.0, max_queue_s=2.0), poll_s=0.5)
        state = {"ttft": 3.0}

        async def drain():
            await asyncio.sleep(0.1)
            state["ttft"] = 0.3
            q.notify()                       # wakes the waiter before its next poll

        task = asyncio.create_task(drain())
        waited, queued = await q.admit(lambda: Estimate(state["ttft"], None, False, False))
        await task
        return waited, queued

    waited, queued = run(scenario())
    assert queued and 0.1 <= waited < 0.4

    # after 0.2 s of waiting the estimate drops to 0.9 s, but 0.2 + 0.9 is past the 1 s target: refused at the limit
    q = AdmissionQueue(AdmissionConfig(ttft_s=1.0, max_queue_s=0.4), poll_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(Overloaded):
        run(q.admit(lambda: Estimate(1.5 if time.monotonic() - t0 < 0.2 else 0.9, None, False, False)))


def test_first_come_first_served():
    async def scenario():
        q = AdmissionQueue(AdmissionConfig(ttft_s=1.0, max_queue_s=5.0), poll_s=0.01)
        room = {"long": False}
        order = []

        async def request(name, estimate):
            await q.admit(estimate)
            order.append(name)

        long = asyncio.create_task(request("long", lambda: Estimate(0.5 if room["long"] else 3.0, None, False, False)))
        await asyncio.sleep(0.02)
        short = asyncio.create_task(request("short", lambda: Estimate(0.1, None, False, False)))
        await asyncio.sleep(0.1)
        assert order == [] and q.num_waiting == 2        # the short one fits, but the long one came first
        room["long"] = True
        await asyncio.gather(long, short)
        return order

    assert run(scenario()) == ["long", "short"]


def test_shutdown_refuses_waiting_requests_as_unavailable():
    q = AdmissionQueue(AdmissionConfig(ttft_s=0.1, max_queue_s=10), poll_s=0.01)
    with pytest.raises(ServiceError, match="shutting down") as info:
        run(q.admit(lambda: Estimate(5.0, None, False, False), closing=lambda: True))
    assert info.value.kind == "unavailable"
