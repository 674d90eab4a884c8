"""The gRPC API through the SDK (sync and asyncio) and through raw stubs: same tokens as the engine, numbered
chunks, Resume after a cut connection with no gap or repeat, aborts that free the KV blocks, deadlines."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest
from conftest import CHAT_PROMPT, MAX_TOKENS, TEXT_PROMPT, CuttableProxy, wait_for_free_blocks

from splitserve.client import AsyncClient, Client, DeadlineExceeded, InvalidArgument, NotFound
from splitserve.proto.v1 import api_pb2 as pb
from splitserve.proto.v1 import api_pb2_grpc


@pytest.fixture(scope="module")
def client(server):
    with Client(server.grpc_target, timeout=60) as c:
        yield c


def test_generate_matches_engine(client, engine):
    out = client.generate(TEXT_PROMPT, max_tokens=MAX_TOKENS)
    assert out.text == engine.text_expected
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == len(engine.text_ids) and out.usage.completion_tokens == MAX_TOKENS
    assert len(out.token_ids) == MAX_TOKENS
    by_ids = client.generate(engine.text_ids, max_tokens=MAX_TOKENS)
    assert by_ids.token_ids == out.token_ids


def test_stream_chat_numbers_chunks(client, engine):
    with client.stream(messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=MAX_TOKENS) as chunks:
        got = list(chunks)
    assert [c.seq for c in got] == list(range(1, len(got) + 1))
    assert all(c.request_id == chunks.request_id for c in got)
    assert "".join(c.text for c in got) == engine.chat_expected
    assert chunks.finish_reason in ("stop", "length") and chunks.usage.completion_tokens == len(got)


def test_async_client_matches_engine(server, engine):
    async def main():
        async with AsyncClient(server.grpc_target, timeout=60) as c:
            out = await c.generate(TEXT_PROMPT, max_tokens=MAX_TOKENS)
            texts = []
            async with c.stream(messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=MAX_TOKENS) as s:
                async for chunk in s:
                    texts.append(chunk.text)
            info, load = await c.model_info(), await c.load()
            return out, "".join(texts), info, load, await c.health()

    out, chat_text, info, load, healthy = asyncio.run(main())
    assert out.text == engine.text_expected and chat_text == engine.chat_expected
    assert info.max_model_len == engine.engine.max_model_len and info.vocab_size > 0 and info.fingerprint
    assert load.num_total_blocks == engine.engine.block_manager.num_blocks and load.workers
    assert healthy


def test_resume_after_channel_closed(server, engine):
    """Read 3 chunks, drop the channel, reconnect and Resume(last_seq=3): the rest, no gap, no repeat."""
    req = pb.GenerateRequest(text=TEXT_PROMPT, params=pb.SamplingParams(max_tokens=MAX_TOKENS))
    channel = grpc.insecure_channel(server.grpc_target)
    seen = []
    for resp in api_pb2_grpc.GenerationStub(channel).Generate(req, timeout=60):
        seen.append(resp.chunk)
        if len(seen) == 3:
            break
    channel.close()
    rid = seen[0].request_id
    with grpc.insecure_channel(server.grpc_target) as channel:
        rest = list(api_pb2_grpc.GenerationStub(channel).Resume(pb.ResumeRequest(request_id=rid, last_seq=3),
                                                                timeout=60))
        assert rest[-1].WhichOneof("event") == "complete"
        seqs = [r.chunk.seq if r.HasField("chunk") else r.complete.seq for r in rest]
        assert seqs == list(range(4, 4 + len(rest)))
        text = "".join(c.text for c in seen) + "".join(r.chunk.text or r.complete.text for r in rest)
        assert text == engine.text_expected
        # finished requests stay resumable (TTL): a full replay from 0
        replay = list(api_pb2_grpc.GenerationStub(channel).Resume(pb.ResumeRequest(request_id=rid), timeout=60))
        assert len(replay) == 3 + len(rest)


def test_sdk_resumes_after_connection_cut(server, engine):
    proxy = CuttableProxy(server.grpc_port)
    try:
        with Client(f"127.0.0.1:{proxy.port}", timeout=60) as c:
            chunks = []
            with c.stream(TEXT_PROMPT, max_tokens=MAX_TOKENS) as s:
                for chunk in s:
                    chunks.append(chunk)
                    if len(chunks) == 3:
                        proxy.cut()
            assert [ch.seq for ch in chunks] == list(range(1, len(chunks) + 1))
            assert "".join(ch.text for ch in chunks) == engine.text_expected
            assert s.finish_reason == "length"
        assert proxy.accepted >= 2, "the client never reconnected"
    finally:
        proxy.close()


def test_closing_the_iterator_aborts_and_frees_blocks(client, service, engine):
    baseline = engine.engine.block_manager.num_free_blocks
    stream = client.stream(TEXT_PROMPT, max_tokens=200, ignore_eos=True)
    first = next(stream)
    assert first.seq == 1
    stream.close()
    assert wait_for_free_blocks(engine.engine, baseline) == baseline
    assert service.logs.get(stream.request_id).events[-1].finish_reason == "abort"


def test_cancel_from_another_thread_aborts(client, service, engine):
    baseline = engine.engine.block_manager.num_free_blocks
    stream = client.stream(TEXT_PROMPT, max_tokens=200, ignore_eos=True)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(stream))
    consumer.start()
    while not got:
        time.sleep(0.01)
    stream.cancel()
    consumer.join(30)
    assert not consumer.is_alive() and len(got) < 200
    assert wait_for_free_blocks(engine.engine, baseline) == baseline
    assert service.logs.get(stream.request_id).events[-1].finish_reason == "abort"


def test_cancelling_async_consumer_aborts(server, service, engine):
    baseline = engine.engine.block_manager.num_free_blocks

    async def main():
        async with AsyncClient(server.grpc_target) as c:
            got = asyncio.Event()
            s = c.stream(TEXT_PROMPT, max_tokens=200, ignore_eos=True)

            async def consume():
                async for _ in s:
                    got.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(got.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return s.request_id

    rid = asyncio.run(main())
    assert wait_for_free_blocks(engine.engine, baseline) == baseline
    assert service.logs.get(rid).events[-1].finish_reason == "abort"


def test_deadline_exceeded_aborts(client, engine):
    baseline = engine.engine.block_manager.num_free_blocks
    with pytest.raises(DeadlineExceeded):
        client.generate(TEXT_PROMPT, max_tokens=200, ignore_eos=True, timeout=0.5)
    assert wait_for_free_blocks(engine.engine, baseline) == baseline


def test_explicit_abort_and_resume_errors(client, service, engine):
    stream = client.stream(TEXT_PROMPT, max_tokens=200, ignore_eos=True)
    next(stream)
    assert client.abort(stream.request_id) is True
    rest = list(stream)                      # the stream ends with the abort
    assert stream.finish_reason == "abort" and len(rest) < 199
    assert client.abort(stream.request_id) is False
    with pytest.raises(NotFound):
        list(client.resume("no-such-request"))
    with pytest.raises(InvalidArgument) as e:
        list(client.resume(stream.request_id, last_seq=10_000))
    assert e.value.field == "last_seq"


def test_retry_before_first_chunk_when_server_comes_up(server, engine):
    """UNAVAILABLE before the first chunk is retried: the port only opens after the first attempt failed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxies = []
    timer = threading.Timer(0.3, lambda: proxies.append(CuttableProxy(server.grpc_port, port=port)))
    timer.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=60, max_retries=8) as c:
            assert c.generate(TEXT_PROMPT, max_tokens=MAX_TOKENS).text == engine.text_expected
    finally:
        timer.join()
        for p in proxies:
            p.close()
