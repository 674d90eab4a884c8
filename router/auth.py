"""The API key: every HTTP route and every RPC needs `authorization: Bearer <key>`, except the health checks.

Keys are compared with `hmac.compare_digest` (constant time). HTTP is guarded by an ASGI middleware in front of
the whole app (so a route added later is guarded too); gRPC by a server interceptor in front of every service.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path

import grpc

HTTP_OPEN_PATHS = frozenset({"/health"})
GRPC_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def load_api_key(api_key: str | None = None, key_file: str | Path | None = None) -> str | None:
    """The key from `--api-key` or `--api-key-file` (first line, stripped); None when neither is given."""
    if api_key and key_file:
        raise ValueError("give either api_key or api_key_file, not both")
    if key_file:
        try:
            text = Path(key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"api_key_file {key_file}: {e.strerror}") from None
        api_key = text.splitlines()[0].strip() if text else ""
        if not api_key:
            raise ValueError(f"api_key_file {key_file} is empty")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty")
    return api_key


def bearer_matches(expected: str, header_value: str | bytes | None) -> bool:
    if header_value is None:
        return False
    if isinstance(header_value, bytes):
        header_value = header_value.decode("latin-1")
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


class HTTPAuthMiddleware:
    """ASGI middleware: 401 with an OpenAI-style error body unless the bearer token is the key."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.api_key = app, api_key
        self._body = json.dumps({"error": {"message": "missing or invalid API key: send 'Authorization: Bearer "
                                           "<key>'", "type": "authentication_error", "param": None,
                                           "code": 401}}).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") in HTTP_OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        if bearer_matches(self.api_key, header):
            return await self.app(scope, receive, send)
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self._body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": self._body})


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every RPC but the health checks with UNAUTHENTICATED unless the bearer token is the key."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(GRPC_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if bearer_matches(self.api_key, metadata.get("authorization")):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _rejecting(handler)


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or invalid API key: send metadata 'authorization: Bearer <key>'")


async def _deny_stream(request, context):
    await _deny(request, context)
    yield  # pragma: no cover - abort raises first


def _rejecting(handler):
    """A handler of the same kind as `handler` (None for unknown methods: UNIMPLEMENTED) that always denies."""
    if handler is None:
        return None
    kw = {"response_serializer": handler.response_serializer}   # the request stays raw bytes: never parsed
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, **kw)
    return grpc.stream_stream_rpc_method_handler(_deny_stream, **kw)
