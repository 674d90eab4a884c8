"""The Redis journal through Redis faults: killed and restarted under load, a write whose reply is lost, Redis
down when the router starts. An acknowledged request (its `create` returned) is never lost, and no token is lost
or duplicated."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from redis_server import RedisServer, ReplyCuttingProxy, free_port

from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.journal import JournalRecord, JournalUnavailable, open_journal
from splitserve.router.journal_redis import RedisJournal

PARAMS = SamplingParams(max_tokens=4096, temperature=1.0, seed=3)


def record(rid: str) -> JournalRecord:
    return JournalRecord(rid, [1, 2, 3], PARAMS, 3, fingerprint="f00d")


def test_redis_killed_and_restarted_under_load_loses_no_acknowledged_request(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    journal = RedisJournal.connect(server.url, ttl_s=60, create_timeout=0.5)
    expected: dict[str, list[int]] = {}       # acknowledged requests -> every token appended
    seqs: dict[str, int] = {}
    finished: set[str] = set()
    refused_creates = appended = 0
    timeline: dict[str, float] = {}

    async def create(rid: str) -> None:
        nonlocal refused_creates
        rec = record(rid)
        while True:                           # retried until acknowledged (the same record: idempotent)
            try:
                await asyncio.to_thread(journal.create, rec)
                break
            except JournalUnavailable:
                refused_creates += 1
        expected[rid], seqs[rid] = [], 0

    async def decode_steps(stop_at: float) -> None:
        nonlocal appended
        step = 0
        while time.monotonic() < stop_at:
            step += 1
            for rid in list(expected):
                if rid in finished:
                    continue
                seqs[rid] += 1
                tokens = [step, seqs[rid]] if step % 5 else []
                journal.append(rid, tokens, seqs[rid])
                appended += 1
                expected[rid] += tokens
            await asyncio.sleep(0.002)

    async def faults() -> None:
        await asyncio.sleep(0.6)
        timeline["lag_before_kill"], timeline["appended_before_kill"] = journal.lag, appended
        server.kill()                         # mid-stream: pipelines in flight are cut
        await asyncio.sleep(0.8)
        t0 = time.monotonic()
        with pytest.raises(JournalUnavailable, match="did not answer"):
            await asyncio.to_thread(journal.create, record("during-outage"))
        timeline["refused_create_s"] = time.monotonic() - t0
        timeline["lag_during_outage"] = journal.lag
        timeline["appended_during_outage"] = appended - timeline["appended_before_kill"]
        await asyncio.to_thread(server.start)             # same port, same AOF
        for rid in sorted(expected)[:10]:
            journal.finish(rid, "stop")
            finished.add(rid)

    async def main() -> None:
        await asyncio.gather(*(create(f"r{i:02d}") for i in range(25)))
        stop_at = time.monotonic() + 3.0
        await asyncio.gather(decode_steps(stop_at), faults(), create_late())

    async def create_late() -> None:          # created under load, one every 0.1 s: some during the outage
        for i in range(25, 50):
            await create(f"r{i:02d}")
            await asyncio.sleep(0.1)

    try:
        asyncio.run(main())
        assert journal.flush(30), f"{journal.lag} writes still queued"
        assert len(expected) == 50 and refused_creates >= 1
        # the stream never waited for Redis: decode steps went on appending while it was down, the writer held them
        assert timeline["appended_during_outage"] > 500, timeline
        assert timeline["lag_during_outage"] > timeline["lag_before_kill"], timeline
        assert timeline["refused_create_s"] < 1.5, timeline
        restarted = RedisJournal.connect(server.url, ttl_s=60)
        try:
            for rid, tokens in expected.items():
                rec = restarted.get(rid)
                assert rec is not None, f"acknowledged request {rid} was lost"
                assert rec.token_ids == tokens, f"{rid}: tokens lost or duplicated"
                assert rec.last_seq == seqs[rid] and rec.finished == (rid in finished)
            assert {r.request_id for r in restarted.unfinished()} == set(expected) - finished
            assert restarted.get("during-outage") is None     # refused, so not journaled
        finally:
            restarted.close()
    finally:
        journal.close(timeout=1)
        server.stop()


def test_a_write_whose_reply_is_lost_is_retried_without_duplicates(redis_server):
    proxy = ReplyCuttingProxy(redis_server.port)
    journal = open_journal(proxy.url, ttl_s=60)
    try:
        journal.create(record("lost-reply"))
        proxy.arm()
        journal.append("lost-reply", [10, 11], 1)
        journal.append("lost-reply", [12], 2)
        assert journal.flush(10)
        assert proxy.cuts == 1                # Redis executed the batch, the writer never saw the reply
        journal.append("lost-reply", [13], 3)
        assert journal.flush(10)
        rec = journal.get("lost-reply")
        assert rec.token_ids == [10, 11, 12, 13] and rec.events() == [(1, [10, 11]), (2, [12]), (3, [13])]
    finally:
        journal.close()
        proxy.close()


def test_redis_down_at_start_is_a_clear_error_within_the_timeout():
    port = free_port()                        # nothing listens there
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    t0 = time.monotonic()
    with pytest.raises(JournalUnavailable) as err:
        open_journal(url, ttl_s=60)
    elapsed = time.monotonic() - t0
    assert elapsed < 5.5
    message = str(err.value)
    assert f"redis://:***@127.0.0.1:{port}/0" in message and "hunter2" not in message
    assert "start Redis or drop --redis-url" in message


def test_a_server_that_never_answers_is_not_a_hang():
    with socket.create_server(("127.0.0.1", 0)) as silent:      # accepts, never replies
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        t0 = time.monotonic()
        with pytest.raises(JournalUnavailable, match=f"cannot reach Redis at {url}"):
            open_journal(url, ttl_s=60, connect_timeout=1.5)
        assert time.monotonic() - t0 < 2.5


def test_a_bad_url_names_the_flag():
    with pytest.raises(JournalUnavailable, match="--redis-url"):
        open_journal("http://127.0.0.1:1/0", ttl_s=60)
