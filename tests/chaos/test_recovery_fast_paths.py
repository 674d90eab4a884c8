"""What keeps a recovered or migrated stream's stall short, on the plain worker classes (no Ray): a re-placed
request (committed tokens: its client is stalled mid-stream) jumps the prefill queue; a migration hands its next
token to `expect` in the same call, and the decode worker waits briefly (once) for that request's KV before a
step instead of a whole step after it."""

from __future__ import annotations

import time

import pytest

from splitserve.decode_workers import worker as decode_worker
from splitserve.decode_workers.worker import DecodeWorker
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv_transfer import KVTransferConfig, TransferSpec, WorkerSpec
from splitserve.prefill_workers.worker import PrefillWorker
from splitserve.work import WorkRequest

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def work(rid: str, committed: list[int] = (), attempt: int = 0) -> WorkRequest:
    return WorkRequest(rid, list(range(300, 340)), PARAMS, seed=1, committed_token_ids=list(committed),
                       attempt=attempt)


def spec(rid: str, src: str, dst: str, num_tokens: int, attempt: int = 0) -> TransferSpec:
    return TransferSpec(rid, WorkerSpec(src), WorkerSpec(dst), num_tokens=num_tokens, attempt=attempt, timeout_s=5)


@pytest.fixture
def quiet_engine(engine_f32):
    """The shared engine, handed back with nothing queued and every block free."""
    yield engine_f32
    for rid in [s.request_id for s in list(engine_f32.scheduler.waiting) + list(engine_f32.scheduler.running)]:
        engine_f32.abort(rid)
    assert engine_f32.block_manager.num_free_blocks == engine_f32.block_manager.num_blocks


def test_a_recovery_goes_ahead_of_fresh_prompts(quiet_engine):
    p = PrefillWorker("p-prio", None, KVTransferConfig(backend="local", worker_id="p-prio"), engine=quiet_engine)
    try:
        p.prefill(work("fresh-1"), spec("fresh-1", "p-prio", "d-x", 40))
        p.prefill(work("fresh-2"), spec("fresh-2", "p-prio", "d-x", 40))
        p.prefill(work("recovered", committed=[5, 6, 7], attempt=1), spec("recovered", "p-prio", "d-x", 43, 1))
        assert [s.request_id for s in quiet_engine.scheduler.waiting] == ["recovered", "fresh-1", "fresh-2"]
        for rid in ("fresh-1", "fresh-2", "recovered"):
            p.abort(rid)
    finally:
        p.kv.close()


def test_a_migration_passes_its_next_token_and_waits_for_its_kv_once(quiet_engine, monkeypatch):
    monkeypatch.setattr(decode_worker, "HANDOVER_WAIT_MIN_S", 0.2)
    monkeypatch.setattr(decode_worker, "HANDOVER_WAIT_MAX_S", 0.4)
    d = DecodeWorker("d-mig", None, KVTransferConfig(backend="local", worker_id="d-mig"), engine=quiet_engine)
    try:
        req = work("moved", committed=[5, 6, 7], attempt=1)
        d.expect(req, spec("moved", "d-gone", "d-mig", 42, 1), 8)    # no sender will ever come
        assert d.incoming["moved"].first_token == 8                  # no begin_decode needed
        t0 = time.monotonic()
        d.tick()                                                      # its KV never arrives: the step goes on
        first = time.monotonic() - t0
        t0 = time.monotonic()
        d.tick()
        again = time.monotonic() - t0
        assert 0.15 <= first < 2.0 and again < 0.1, (first, again)   # waited once, bounded
        assert "moved" in d.incoming and d.engine.scheduler.running == []
        assert d.abort("moved")
        d.last_step_s = 5.0                  # nothing runs here: the wait is HANDOVER_WAIT_MAX_S, whatever a step took
        d.expect(work("moved-2", committed=[5, 6, 7], attempt=1), spec("moved-2", "d-gone", "d-mig", 42, 1), 8)
        t0 = time.monotonic()
        d.tick()
        assert 0.35 <= time.monotonic() - t0 < 2.0
        assert d.abort("moved-2")
    finally:
        d.kv.close()


def test_an_idle_decode_worker_reclaims_parked_blocks_every_tick(quiet_engine):
    """Blocks a transport thread parked (a receive failed while still writing into them) are given back by the
    worker's next tick even when it has no transfer left to poll: a drained or idle worker returns to baseline."""
    d = DecodeWorker("d-idle", None, KVTransferConfig(backend="local", worker_id="d-idle"), engine=quiet_engine)
    calls = []
    d.kv.reclaim = lambda: calls.append(1)          # the backend's own behaviour is tested in tests/kv_transfer
    try:
        d.tick()
        d.tick()
        assert len(calls) == 2 and not d.incoming and not d.outgoing
    finally:
        d.kv.close()


def test_aborting_a_migrated_request_unpins_its_outgoing_kv_at_once(quiet_engine):
    """A migration whose destination never asks (the router gave up on it and recomputes the request) holds the
    request's pages until its lease ends; the router's abort ends it at once, so a drained worker's blocks come
    back without waiting out the lease."""
    d = DecodeWorker("d-out", None, KVTransferConfig(backend="local", worker_id="d-out"), engine=quiet_engine)
    bm = quiet_engine.block_manager
    try:
        d.submit_local(work("leaving"))
        while not quiet_engine.scheduler.running:
            d.tick()
        d.tick()
        state = d.migrate_out("leaving", spec("leaving", "d-out", "d-nowhere", 1, 1))
        assert state is not None and state.num_computed_tokens > 40 and "leaving" in d.outgoing
        assert bm.num_free_blocks < bm.num_blocks                   # pinned for the sender, not by a sequence
        assert not quiet_engine.scheduler.running and not quiet_engine.scheduler.waiting
        d.abort("leaving")
        assert not d.outgoing and bm.num_free_blocks == bm.num_blocks
    finally:
        d.kv.close()


def test_a_later_placement_of_the_same_request_frees_the_earlier_one(quiet_engine):
    """A decode worker dies mid-placement: the placement task retries on another worker while the router's health
    path re-places the same request, and both may land here. The chaos run caught the later `expect` overwriting
    the earlier one, whose receiver's blocks were then never freed (a drained worker stayed at 5 blocks held).
    The later attempt must replace the earlier one and give its blocks back; an earlier one arriving late is
    refused and changes nothing."""
    d = DecodeWorker("d-twice", None, KVTransferConfig(backend="local", worker_id="d-twice"), engine=quiet_engine)
    bm = quiet_engine.block_manager
    try:
        d.expect(work("twice", committed=[5, 6, 7], attempt=1), spec("twice", "p-gone", "d-twice", 43, 1))
        one = bm.num_free_blocks
        assert one < bm.num_blocks
        d.expect(work("twice", committed=[5, 6, 7], attempt=2), spec("twice", "p-gone", "d-twice", 43, 2))
        assert bm.num_free_blocks == one and d.incoming["twice"].request.attempt == 2
        with pytest.raises(decode_worker.StaleAttemptError, match="attempt 1 arrived after attempt 2"):
            d.expect(work("twice", committed=[5, 6, 7], attempt=1), spec("twice", "p-gone", "d-twice", 43, 1))
        assert bm.num_free_blocks == one and d.incoming["twice"].request.attempt == 2
        d.submit_local(work("twice", committed=[5, 6, 7], attempt=3))     # the next placement prefills here
        assert "twice" not in d.incoming and [s.request_id for s in quiet_engine.scheduler.waiting] == ["twice"]
        assert d.abort("twice")
        assert bm.num_free_blocks == bm.num_blocks
    finally:
        d.kv.close()
