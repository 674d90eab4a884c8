"""`EngineService` directly: numbered event logs, replay from any seq, TTL, aborts that free blocks, errors."""

from __future__ import annotations

import asyncio

import pytest
from conftest import MAX_TOKENS, wait_for_free_blocks

from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.service import GenerateRequest, ServiceError


def _run(coro):
    return asyncio.run(coro)


async def _collect(service, rid, after=0):
    return [ev async for ev in service.stream(rid, after)]


def test_events_are_numbered_and_replayable(service, engine):
    async def main():
        rid = await service.submit(GenerateRequest(engine.text_ids, SamplingParams(max_tokens=MAX_TOKENS)))
        events = await _collect(service, rid)
        return rid, events, await _collect(service, rid, 3), await _collect(service, rid, len(events))

    rid, events, tail, nothing = _run(main())
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == engine.text_expected
    assert sum(len(e.token_ids) for e in events) == MAX_TOKENS
    assert tail == events[3:] and nothing == []
    with pytest.raises(ServiceError) as e:
        service.stream(rid, len(events) + 1)
    assert e.value.kind == "invalid_argument" and e.value.field == "last_seq"


def test_concurrent_readers_and_requests(service, engine):
    async def main():
        rids = [await service.submit(GenerateRequest(engine.text_ids, SamplingParams(max_tokens=4)))
                for _ in range(3)]
        # two live readers of the same request see the same events
        a, b, c, d = await asyncio.gather(*(_collect(service, rid) for rid in [rids[0], rids[0], *rids[1:]]))
        return a, b, c, d

    a, b, c, d = _run(main())
    assert a == b
    assert all(len(x) == 4 and x[-1].finished for x in (a, c, d))


def test_finished_logs_expire(service, engine):
    async def main():
        rid = await service.submit(GenerateRequest(engine.text_ids, SamplingParams(max_tokens=1)))
        await _collect(service, rid)
        return rid

    rid = _run(main())
    assert service.logs.get(rid) is not None
    service.logs.expire(now=service.logs.get(rid).finished_at + service.logs.ttl_s + 1)
    with pytest.raises(ServiceError) as e:
        service.stream(rid)
    assert e.value.kind == "not_found"


def test_abort_frees_blocks(service, engine):
    bm = engine.engine.block_manager
    baseline = bm.num_free_blocks

    async def main():
        rid = await service.submit(GenerateRequest(engine.text_ids, SamplingParams(max_tokens=500, ignore_eos=True)))
        events = []
        async for ev in service.stream(rid):
            events.append(ev)
            if len(events) == 2:
                assert bm.num_free_blocks < baseline
                assert await service.abort(rid) is True
        return rid, events, await service.abort(rid), await service.abort("nope")

    rid, events, again, unknown = _run(main())
    assert events[-1].finished and events[-1].finish_reason == "abort"
    assert again is False and unknown is False
    assert wait_for_free_blocks(engine.engine, baseline) == baseline
    assert service.load().num_running == 0


def test_invalid_requests(service, engine):
    cases = [(GenerateRequest([], SamplingParams()), "prompt"),
             (GenerateRequest([10**8], SamplingParams()), "prompt"),
             (GenerateRequest(engine.text_ids, SamplingParams(max_tokens=10**6)), "max_tokens"),
             (GenerateRequest(engine.text_ids, SamplingParams(), model="other"), "model"),
             (GenerateRequest(engine.text_ids, SamplingParams(), request_id=""), "request_id")]
    for request, field in cases:
        with pytest.raises(ServiceError) as e:
            _run(service.submit(request))
        assert e.value.kind == "invalid_argument" and e.value.field == field
    with pytest.raises(ServiceError) as e:
        service.stream("no-such-id")
    assert e.value.kind == "not_found"


def test_model_info_and_load(service, engine):
    info = service.model_info()
    assert info.name == service.model_name and info.max_model_len == engine.engine.max_model_len
    assert info.block_size == engine.engine.config.block_size and info.dtype == "float32"
    load = service.load()
    assert load.num_total_blocks == engine.engine.block_manager.num_blocks and 0 <= load.kv_cache_usage <= 1
    assert service.metrics.request_success.labels(service.model_name, "length")._value.get() >= 1
