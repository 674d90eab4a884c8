"""Errors the SDK raises: one class per gRPC status a caller handles differently, all `SplitServeError`."""

from __future__ import annotations

import grpc

FIELD_METADATA_KEY = "splitserve-field"


class SplitServeError(Exception):
    """`code` is the gRPC status name (e.g. "INVALID_ARGUMENT"); `field` names the offending request field."""

    def __init__(self, message: str, code: str = "UNKNOWN", field: str | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.field, self.request_id = message, code, field, request_id


class InvalidArgument(SplitServeError, ValueError):
    pass


class Unauthenticated(SplitServeError):
    pass


class NotFound(SplitServeError):
    pass


class Unavailable(SplitServeError, ConnectionError):
    pass


class DeadlineExceeded(SplitServeError, TimeoutError):
    pass


class Overloaded(SplitServeError):
    """The router's admission control refused the request (it could not meet its latency targets): retry later."""


class GenerationFailed(SplitServeError):
    """The server failed the request after it started (an `Error` message in the stream)."""


_BY_CODE = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
            grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.UNAVAILABLE: Unavailable,
            grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded}


def from_rpc_error(e: grpc.RpcError, request_id: str | None = None) -> SplitServeError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(code)
    field = None
    try:
        trailers = e.trailing_metadata() or ()
        field = dict((k, v) for k, v in trailers).get(FIELD_METADATA_KEY)
    except Exception:
        pass
    cls = _BY_CODE.get(code, SplitServeError)
    return cls(details, code.name if code else "UNKNOWN", field, request_id)
