"""The OpenAI-compatible HTTP API through the official `openai` client: completions and chat, streamed and not,
the same text as the engine, the request id, usage chunks, models, metrics, and aborts on disconnect."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest
from conftest import CHAT_PROMPT, MAX_TOKENS, TEXT_PROMPT, wait_for_free_blocks, wait_until_running


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(service):
    return service.model_name


def test_completion(oai, model, engine):
    raw = oai.completions.with_raw_response.create(model=model, prompt=TEXT_PROMPT, max_tokens=MAX_TOKENS)
    out = raw.parse()
    assert out.choices[0].text == engine.text_expected
    assert out.choices[0].finish_reason == "length"
    assert out.id == raw.headers["x-request-id"]
    assert out.usage.prompt_tokens == len(engine.text_ids) and out.usage.completion_tokens == MAX_TOKENS


def test_completion_from_token_ids(oai, model, engine):
    out = oai.completions.create(model=model, prompt=engine.text_ids, max_tokens=MAX_TOKENS)
    assert out.choices[0].text == engine.text_expected


def test_completion_stream_with_usage(oai, model, engine):
    chunks = list(oai.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=MAX_TOKENS, stream=True,
                                         stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == engine.text_expected
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1


def test_chat(oai, model, engine):
    out = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT_PROMPT}],
                                      max_completion_tokens=MAX_TOKENS)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == engine.chat_expected
    assert out.usage.prompt_tokens == len(engine.chat_ids)


def test_chat_stream(oai, model, engine):
    chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT_PROMPT}],
                                              max_tokens=MAX_TOKENS, stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == engine.chat_expected
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(engine.chat_ids)


def test_stream_ends_with_done(server, model):
    body = {"model": model, "messages": [{"role": "user", "content": CHAT_PROMPT}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["id"] == r.headers["x-request-id"]


def test_client_chosen_request_id(server, model):
    r = httpx.post(f"{server.base_url}/v1/completions", headers={"x-request-id": "my-id-1"},
                   json={"model": model, "prompt": TEXT_PROMPT, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "my-id-1" and r.headers["x-request-id"] == "my-id-1"


def test_models(oai, model, engine):
    models = oai.models.list()
    assert [m.id for m in models.data] == [model]
    assert oai.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_health_and_metrics(server, oai, model):
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    oai.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=2)
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 'vllm:request_success_total{finished_reason="length"', "splitserve_kv_transfer_bytes_total",
                 "splitserve_kv_transfer_seconds", "splitserve_migrations_total", "splitserve_recoveries_total",
                 "splitserve_prefix_cache_hit_tokens_total"):
        assert name in text, name
    assert "# TYPE splitserve_placement_decisions_total counter" in text


def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_disconnect_aborts_and_frees_blocks(server, service, engine, model, stream):
    baseline = engine.engine.block_manager.num_free_blocks
    sock = _raw_post(server.http_port, "/v1/completions", {"model": model, "prompt": TEXT_PROMPT, "max_tokens": 300,
                                                           "ignore_eos": True, "stream": stream})
    if stream:
        received = b""
        while b"data: " not in received:          # read until mid-stream
            data = sock.recv(65536)
            assert data, "the server closed the stream"
            received += data
    else:
        wait_until_running(service)
    sock.close()
    assert wait_for_free_blocks(engine.engine, baseline) == baseline
    aborted = service.metrics.request_success.labels(service.model_name, "abort")._value.get()
    assert aborted >= 1
