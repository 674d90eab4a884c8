"""The API key guards every HTTP route and every RPC (enumerated from the app and the server, so a new one cannot
be missed) except the health checks; TLS serves gRPC and HTTPS with a certificate made here."""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl

import grpc
import httpx
import openai
import pytest
from conftest import MAX_TOKENS, TEXT_PROMPT, ServerThread
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.routing import APIRoute
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from starlette.routing import Route

from splitserve.client import Client, Unauthenticated, Unavailable
from splitserve.router.auth import load_api_key

KEY = "sk-test-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(service):
    s = ServerThread(service, api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def tls_server(service, cert):
    s = ServerThread(service, api_key=KEY, tls_cert=cert[0], tls_key=cert[1])
    yield s
    s.stop()


# ---- HTTP ---------------------------------------------------------------------------------------------------------
def _http_routes(app) -> list[tuple[str, str]]:
    routes = []
    for r in app.routes:
        if isinstance(r, (APIRoute, Route)):
            path = re.sub(r"\{[^}]+\}", "x", r.path)
            routes += [(m, path) for m in sorted(r.methods or ()) if m != "HEAD"]
    return routes


VALID_BODIES = {"/v1/completions": {"prompt": TEXT_PROMPT, "max_tokens": 1},
                "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}}


def test_every_http_route_needs_the_key(keyed):
    routes = _http_routes(keyed.frontends.app)
    assert {p for _, p in routes} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                      "/metrics", "/openapi.json"}
    with httpx.Client(base_url=keyed.base_url, timeout=60) as http:
        for method, path in routes:
            body = VALID_BODIES.get(path, {}) if method == "POST" else None
            bare = http.request(method, path, json=body)
            wrong = http.request(method, path, json=body, headers={"authorization": "Bearer nope"})
            good = http.request(method, path, json=body, headers=AUTH)
            if path == "/health":
                assert bare.status_code == 200, path
                continue
            for r in (bare, wrong):
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.json()["error"]["type"] == "authentication_error"
            assert good.status_code != 401, (method, path)
            if path in VALID_BODIES or method == "GET" and path != "/v1/models/x":
                assert good.status_code == 200, (method, path, good.text)


def test_openai_client_with_key(keyed, service):
    with openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEY, max_retries=0) as c:
        assert c.completions.create(model=service.model_name, prompt=TEXT_PROMPT, max_tokens=2).usage
    with openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


# ---- gRPC ---------------------------------------------------------------------------------------------------------
def _grpc_methods(target: str):
    """(path, method descriptor) of every RPC of every service the server registers (asked via reflection)."""
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              metadata=tuple(AUTH.items()), timeout=30)
        names = [s.name for r in responses for s in r.list_services_response.service]
    pool = descriptor_pool.Default()
    return [(f"/{name}/{m.name}", m) for name in names for m in pool.FindServiceByName(name).methods]


def _call(channel, path, method, metadata):
    """Call with an empty request; returns the status code (OK when a first message or a response came)."""
    kind = ("stream_" if method.client_streaming else "unary_") + ("stream" if method.server_streaming else "unary")
    fn = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
    request = iter([b""]) if method.client_streaming else b""
    try:
        result = fn(request, metadata=metadata, timeout=10)
        if method.server_streaming:
            next(result)
            result.cancel()
    except StopIteration:
        pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_every_rpc_needs_the_key(keyed):
    methods = _grpc_methods(keyed.grpc_target)
    names = {p for p, _ in methods}
    assert {"/splitserve.v1.Generation/Generate", "/splitserve.v1.Generation/Resume",
            "/splitserve.v1.Generation/Abort", "/splitserve.v1.Generation/GetModelInfo",
            "/splitserve.v1.Generation/GetLoad", "/grpc.health.v1.Health/Check"} <= names
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        for path, method in methods:
            bare = _call(channel, path, method, ())
            wrong = _call(channel, path, method, (("authorization", "Bearer nope"),))
            good = _call(channel, path, method, tuple(AUTH.items()))
            if path.startswith("/grpc.health.v1.Health/"):      # open (List is unimplemented upstream)
                assert bare != grpc.StatusCode.UNAUTHENTICATED, path
                continue
            assert bare == wrong == grpc.StatusCode.UNAUTHENTICATED, (path, bare, wrong)
            assert good != grpc.StatusCode.UNAUTHENTICATED, path


def test_sdk_with_key(keyed, engine):
    with Client(keyed.grpc_target, api_key=KEY, timeout=60) as c:
        assert c.generate(TEXT_PROMPT, max_tokens=MAX_TOKENS).text == engine.text_expected
        assert c.health()
    with Client(keyed.grpc_target, timeout=60) as c:
        assert c.health()                                    # open without the key
        with pytest.raises(Unauthenticated):
            c.generate(TEXT_PROMPT, max_tokens=1)
        with pytest.raises(Unauthenticated):
            c.model_info()


# ---- TLS ----------------------------------------------------------------------------------------------------------
def test_tls_grpc_and_https(tls_server, cert, engine, service):
    with Client(tls_server.grpc_target, api_key=KEY, root_certificates=cert[0].read_bytes(),
                timeout=60) as c:
        assert c.generate(TEXT_PROMPT, max_tokens=MAX_TOKENS).text == engine.text_expected
    with Client(tls_server.grpc_target, api_key=KEY, timeout=5, max_retries=0) as plain:
        with pytest.raises(Unavailable):
            plain.model_info()
    with openai.OpenAI(base_url=f"{tls_server.base_url}/v1", api_key=KEY, max_retries=0,
                       http_client=httpx.Client(verify=ssl.create_default_context(cafile=cert[0]))) as c:
        out = c.chat.completions.create(model=service.model_name, max_tokens=2,
                                        messages=[{"role": "user", "content": "hi"}])
        assert out.usage.completion_tokens == 2
    assert httpx.get(f"{tls_server.base_url}/health",
                     verify=ssl.create_default_context(cafile=cert[0])).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tls_server.base_url}/health")        # an unknown CA is refused


def test_key_file(tmp_path):
    (tmp_path / "key").write_text("  secret-1\n")
    assert load_api_key(None, tmp_path / "key") == "secret-1"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_api_key(None, tmp_path / "empty")
    with pytest.raises(ValueError, match="not both"):
        load_api_key("a", tmp_path / "key")
