"""Bad input gets a 400 / INVALID_ARGUMENT (413 for an oversized body) whose message names the field; never a 5xx,
and the server keeps serving."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from conftest import TEXT_PROMPT

from splitserve.client import Client, InvalidArgument
from splitserve.proto.v1 import api_pb2 as pb
from splitserve.proto.v1 import api_pb2_grpc

LONG_PROMPT = "hello " * 9000          # past the 8192-token context
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


# (path, body, field that must be named)
HTTP_CASES = [
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, "stop"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, "model"),
    ("/v1/completions", {"prompt": "x", "stream": "true"}, "stream"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, "prompt"),
    ("/v1/completions", {"prompt": [1, -2]}, "prompt"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, "model"),
    ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, "prompt"),
]


@pytest.mark.parametrize("path,body,field", HTTP_CASES, ids=[f"{p.split('/')[2]}-{f}-{i}"
                                                             for i, (p, _, f) in enumerate(HTTP_CASES)])
def test_http_bad_field(http, path, body, field):
    # json.dumps escapes unpaired surrogates as \udXXX, which JSON allows and which decode to invalid UTF-8
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["param"] == field, err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw,content_type", [(b'{"prompt": "x",', "application/json"),
                                              (b'{"prompt": "\xff\xfe"}', "application/json"),
                                              (b"[1, 2]", "application/json"),
                                              (b"prompt=x", "application/x-www-form-urlencoded")],
                         ids=["truncated", "not-utf8", "not-object", "not-json"])
def test_http_malformed_body(http, raw, content_type):
    r = http.post("/v1/completions", content=raw, headers={"content-type": content_type})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "body" and "body" in r.json()["error"]["message"]


def test_http_oversized_body(http):
    r = http.post("/v1/completions", content=json.dumps({"prompt": "x" * (5 << 20)}),
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["error"]["message"]
    chunked = http.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * (5 << 20), b'"}']),
                        headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_http_unknown_route_and_method(http):
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/completions").status_code == 405


def test_server_still_serves(http):
    r = http.post("/v1/completions", json={"prompt": TEXT_PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ---- gRPC --------------------------------------------------------------------------------------------------------
GRPC_CASES = [
    (dict(prompt="x", max_tokens=0), "max_tokens"),
    (dict(prompt="x", temperature=-0.5), "temperature"),
    (dict(prompt="x", top_p=1.5), "top_p"),
    (dict(prompt="x", repetition_penalty=0.0), "repetition_penalty"),
    (dict(prompt="x", seed=2**63), "seed"),
    (dict(prompt="x", stop=[""]), "stop"),
    (dict(prompt="x", model="gpt-4"), "model"),
    (dict(prompt=""), "text"),
    (dict(prompt=[]), "token_ids"),
    (dict(prompt=[10**9]), "prompt"),
    (dict(prompt=LONG_PROMPT, max_tokens=1), "prompt"),
    (dict(prompt="x", max_tokens=9000), "max_tokens"),
    (dict(messages=[]), "chat"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "chat[0].role"),
    (dict(prompt="x", request_id="bad\nid"), "request_id"),
]


@pytest.fixture(scope="module")
def client(server):
    with Client(server.grpc_target, timeout=60) as c:
        yield c


@pytest.mark.parametrize("kwargs,field", GRPC_CASES, ids=[f for _, f in GRPC_CASES])
def test_grpc_bad_field(client, kwargs, field):
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(InvalidArgument) as e:
        client.generate(prompt, **kwargs)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.field == field and field in e.value.message


def test_grpc_duplicate_request_id(client):
    client.generate("x", max_tokens=1, request_id="dup-1")
    with pytest.raises(InvalidArgument) as e:
        client.generate("x", max_tokens=1, request_id="dup-1")
    assert e.value.field == "request_id"


def test_grpc_missing_prompt_and_malformed_message(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = api_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.value.details()
        # field 1 (text) with bytes that are not UTF-8: only a hand-made client can send this
        raw = channel.unary_stream("/splitserve.v1.Generation/Generate", request_serializer=None,
                                   response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            list(raw(b"\x0a\x02\xff\xfe", timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Resume(pb.ResumeRequest(), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.value.details()


def test_grpc_still_serves(client):
    assert client.generate(TEXT_PROMPT, max_tokens=2).usage.completion_tokens == 2
