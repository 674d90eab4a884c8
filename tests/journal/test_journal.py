"""Both journal stores (in-process and a real Redis) keep what a resumed request needs: prompt, parameters, seed
and every committed token, in order, exactly once; finished records expire; unfinished ones are listed."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.journal import Journal, JournalError, JournalRecord, RequestIdInUse, open_journal
from splitserve.work import WorkRequest

PARAMS = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, top_k=40, seed=None, stop=("\n\n", "END"),
                        stop_token_ids=(2, 7))


def record(rid: str, prompt: list[int] | None = None, seed: int = 2**63 - 1) -> JournalRecord:
    return JournalRecord(rid, prompt or [1, 5, 9, 151], PARAMS, seed, fingerprint="ab12cd34")


def reopened(journal: Journal) -> Journal:
    """What a restarted router opens: the same store (Redis) or, in process, the same journal."""
    if type(journal).__name__ == "RedisJournal":
        return open_journal(journal.url, ttl_s=journal.ttl_s)
    return journal


def test_round_trip(journal):
    journal.create(record("r1"))
    journal.append("r1", [11], 1)                 # the first token (from prefill)
    journal.append("r1", [12, 13], 2)             # a decode step
    journal.append("r1", [], 3)                   # an event without tokens keeps seq numbering aligned
    journal.append("r1", [14], 4)
    journal.finish("r1", "length")
    assert journal.flush(5)
    rec = journal.get("r1")
    assert rec.prompt_token_ids == [1, 5, 9, 151]
    assert rec.params == PARAMS and rec.seed == 2**63 - 1 and rec.fingerprint == "ab12cd34"
    assert rec.token_ids == [11, 12, 13, 14] and rec.last_seq == 4
    assert rec.events() == [(1, [11]), (2, [12, 13]), (3, []), (4, [14])]
    assert rec.finished and rec.finish_reason == "length" and rec.error is None and rec.finished_at > rec.created_at
    assert rec.to_work() == WorkRequest("r1", [1, 5, 9, 151], PARAMS, 2**63 - 1, [11, 12, 13, 14])
    assert journal.get("nope") is None


def test_error_finish_keeps_the_message(journal):
    journal.create(record("r1"))
    journal.finish("r1", "error", error="request r1 failed after 5 placements")
    journal.finish("r1", "abort")                 # finishing twice changes nothing
    assert journal.flush(5)
    rec = journal.get("r1")
    assert (rec.finish_reason, rec.error) == ("error", "request r1 failed after 5 placements")


def test_append_is_idempotent_by_seq_and_refuses_gaps(journal):
    journal.create(record("r1"))
    journal.append("r1", [11], 1)
    journal.append("r1", [11], 1)                 # a retried call: ignored
    with pytest.raises(JournalError, match="gap"):
        journal.append("r1", [13], 3)
    with pytest.raises(JournalError, match="not in the journal"):
        journal.append("unknown", [1], 1)
    journal.finish("r1", "stop")
    with pytest.raises(JournalError, match="not in the journal"):
        journal.append("r1", [12], 2)
    assert journal.flush(5)
    assert journal.get("r1").token_ids == [11]


def test_create_refuses_a_taken_id(journal):
    journal.create(record("r1"))
    with pytest.raises(RequestIdInUse, match="r1"):
        journal.create(record("r1", prompt=[3]))
    assert journal.get("r1").prompt_token_ids == [1, 5, 9, 151]


def test_unfinished_lists_running_requests_for_a_restarted_router(journal):
    for i in range(4):
        journal.create(record(f"r{i}", prompt=[i + 1] * (i + 1)))
        journal.append(f"r{i}", [100 + i], 1)
    journal.finish("r2", "stop")
    assert journal.flush(5)
    restarted = reopened(journal)
    try:
        recs = restarted.unfinished()
        assert [r.request_id for r in recs] == ["r0", "r1", "r3"]           # oldest first
        assert [r.prompt_token_ids for r in recs] == [[1], [2, 2], [4, 4, 4, 4]]
        assert all(r.token_ids == [100 + int(r.request_id[1:])] and r.last_seq == 1 for r in recs)
        # the restarted router carries on where the old one stopped; a replayed seq is ignored
        restarted.append("r0", [100], 1)
        restarted.append("r0", [200], 2)
        restarted.finish("r1", "abort")
        assert restarted.flush(5)
        assert restarted.get("r0").token_ids == [100, 200]
        assert [r.request_id for r in restarted.unfinished()] == ["r0", "r3"]
    finally:
        if restarted is not journal:
            restarted.close()


def test_finished_records_expire_after_the_ttl(journal):
    journal.create(record("done"))
    journal.create(record("running"))
    journal.append("done", [5], 1)
    journal.finish("done", "stop")
    assert journal.flush(5)
    assert journal.get("done").token_ids == [5]
    time.sleep(journal.ttl_s + 0.3)
    assert journal.get("done") is None
    assert journal.get("running") is not None            # only finished records expire
    journal.create(record("done", prompt=[8]))           # the id is free again, and starts empty
    rec = journal.get("done")
    assert rec.prompt_token_ids == [8] and rec.token_ids == [] and not rec.finished


def test_interleaved_appends_from_an_event_loop_keep_every_token_in_order(journal):
    n_requests, n_steps = 100, 40
    rng = random.Random(7)
    for i in range(n_requests):
        journal.create(record(f"q{i}", seed=i))
    expected = {f"q{i}": [] for i in range(n_requests)}

    async def stream(rid: str) -> None:
        for seq in range(1, n_steps + 1):
            tokens = [rng.randrange(50_000) for _ in range(rng.choice((0, 1, 1, 1, 3)))]
            expected[rid] += tokens
            journal.append(rid, tokens, seq)
            await asyncio.sleep(0 if rng.random() < 0.7 else 0.001)

    async def main() -> None:
        await asyncio.gather(*(stream(rid) for rid in expected))

    asyncio.run(main())
    assert journal.flush(10) and journal.lag == 0
    for rid, tokens in expected.items():
        rec = journal.get(rid)
        assert rec.token_ids == tokens and rec.last_seq == n_steps, rid
