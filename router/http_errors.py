"""HTTP errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the body-size limit.

FastAPI's 422 for a body that does not match the schema becomes a 400 whose message and `param` name the field;
a body past `max_body_bytes` is a 413 before any of it is parsed.
"""

from __future__ import annotations

import json
import math
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from .service import ServiceError

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_DRAIN_CAP_BYTES = 64 * 1024 * 1024
_STATUS = {"invalid_argument": 400, "unauthenticated": 401, "not_found": 404, "too_large": 413,
           "resource_exhausted": 429, "unavailable": 503, "internal": 500}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
          503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def service_error_status(e: ServiceError) -> int:
    return _STATUS.get(e.kind, 500)


def field_path(loc: tuple, known_fields: set[str]) -> str:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content' (pydantic union tags dropped)."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part in known_fields:
            path += f".{part}" if path else part
        else:
            break
    return path or "body"


def validation_message(errors: list[dict], known_fields: set[str]) -> tuple[str, str]:
    """(message, field) for a RequestValidationError's errors."""
    if errors and errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "JSON decode error")
        return f"body is not valid JSON: {detail} (at character {errors[0]['loc'][-1]})", "body"
    by_field: dict[str, list[str]] = {}
    for err in errors[:6]:
        msgs = by_field.setdefault(field_path(tuple(err.get("loc", ())), known_fields), [])
        if err.get("msg", "invalid") not in msgs:
            msgs.append(err.get("msg", "invalid"))
    parts = [f"{field}: {' / '.join(msgs)}" for field, msgs in by_field.items()]
    first = next(iter(by_field), None)
    return "; ".join(parts) or "invalid request body", first or "body"


def install_error_handlers(app: FastAPI, known_fields: set[str]) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = validation_message(list(exc.errors()), known_fields)
        return error_response(400, message, field)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after_s", None)   # an overloaded router says when to try again
        headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after else None
        return error_response(service_error_status(exc), exc.message, exc.field, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:   # FastAPI could not read the body at all (e.g. it is not UTF-8)
            return error_response(400, "body could not be parsed: send UTF-8 encoded JSON", "body")
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")


class BodyLimitMiddleware:
    """Reads the whole body (up to `max_bytes`) before the app sees it; 413 past the limit (ASGI middleware)."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _reject(self.max_bytes)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await too_large(scope, receive, send, more_body=message.get("more_body", False))
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()       # after the body: http.disconnect, when the client goes away

        await self.app(scope, replay, send)


def _reject(max_bytes: int):
    body = json.dumps(error_body(413, f"body is larger than the limit of {max_bytes} bytes", "body")).encode()

    async def respond(scope, receive, send, more_body: bool = True) -> None:
        # Read (and drop) the rest of the body first, up to a cap: closing a socket with unread data makes the
        # kernel reset the connection, and the client would lose the 413 it is owed.
        drained = 0
        while more_body and drained < _DRAIN_CAP_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more_body = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
    return respond
