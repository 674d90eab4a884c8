"""The blocking gRPC client.

    with Client("localhost:50051", api_key="KEY") as client:
        print(client.generate("The capital of France is", max_tokens=16).text)
        with client.stream(messages=[{"role": "user", "content": "Hi"}]) as chunks:
            for chunk in chunks:
                print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import threading
import time
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.proto.v1 import api_pb2 as pb
from splitserve.proto.v1 import api_pb2_grpc

from ._common import (ABORT_TIMEOUT_S, CHANNEL_OPTIONS, NO_ABORT_CODES, StreamState, build_request,
                      channel_credentials, deadline_after, metadata, to_load_info, to_model_info)
from .errors import SplitServeError, from_rpc_error
from .types import Chunk, Completion, LoadInfo, ModelInfo

SERVICE_NAME = "splitserve.v1.Generation"


class Client:
    """`target` is host:port. TLS: `root_certificates` (PEM bytes, string or file path) or `tls=True` for the
    system roots. `api_key` is sent as `authorization: Bearer KEY`. `timeout` is the default per-call deadline
    in seconds (None: none). A dropped connection is retried (before the first chunk) or resumed (after it) up
    to `max_retries` times in a row, each time waiting up to `reconnect_timeout` s for the server to be back."""

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, tls: bool | None = None,
                 root_certificates: bytes | str | None = None, timeout: float | None = None, max_retries: int = 3,
                 reconnect_timeout: float = 30.0, channel_options: list[tuple[str, object]] | None = None) -> None:
        creds = channel_credentials(tls, root_certificates)
        options = CHANNEL_OPTIONS + list(channel_options or [])
        self._channel = (grpc.secure_channel(target, creds, options) if creds is not None
                         else grpc.insecure_channel(target, options))
        self._stub = api_pb2_grpc.GenerationStub(self._channel)
        self._metadata = metadata(api_key)
        self.timeout, self.max_retries, self.reconnect_timeout = timeout, max_retries, reconnect_timeout

    # ---- generation --------------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int] | None = None, *, messages: list[dict] | None = None,
                 request_id: str | None = None, model: str | None = None, timeout: float | None = None,
                 **sampling) -> Completion:
        """Run a request to the end. `prompt` is text or token ids; `messages` a chat ([{"role", "content"}])."""
        with self.stream(prompt, messages=messages, request_id=request_id, model=model, timeout=timeout,
                         **sampling) as chunks:
            return chunks.completion()

    def stream(self, prompt: str | Sequence[int] | None = None, *, messages: list[dict] | None = None,
               request_id: str | None = None, model: str | None = None, timeout: float | None = None,
               **sampling) -> ChunkStream:
        """An iterator of `Chunk`s; closing it (or leaving its `with` block) early aborts the request."""
        request = build_request(prompt, messages, request_id, model, sampling)
        return ChunkStream(self, request, StreamState(request.request_id, deadline_after(_pick(timeout, self))))

    def resume(self, request_id: str, last_seq: int = 0, *, timeout: float | None = None) -> ChunkStream:
        """The chunks after `last_seq` of a running or recently finished request (e.g. from another process)."""
        state = StreamState(request_id, deadline_after(_pick(timeout, self)), last_seq=last_seq, resuming=True,
                            can_submit=False)
        return ChunkStream(self, None, state)

    def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        return self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout).aborted

    # ---- information -------------------------------------------------------------------------------------------
    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return to_model_info(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def load(self, *, timeout: float | None = None) -> LoadInfo:
        return to_load_info(self._unary(self._stub.GetLoad, pb.GetLoadRequest(), timeout))

    def health(self, *, timeout: float | None = 5.0) -> bool:
        """True when the server reports SERVING (grpc.health.v1; needs no API key)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        except grpc.RpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------------------------------
    def _unary(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=_pick(timeout, self), metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=ABORT_TIMEOUT_S,
                             metadata=self._metadata)
        except Exception:         # best effort: the channel may be down or closed
            pass


class ChunkStream(Iterator[Chunk]):
    """A request's chunks. After the last one, `finish_reason` and `usage` are set. `close()` (or leaving the
    `with` block) before the end aborts the request; `cancel()` does the same from another thread."""

    def __init__(self, client: Client, request: pb.GenerateRequest | None, state: StreamState) -> None:
        self._client, self._request, self._state = client, request, state
        self._call = None
        self._cancelled = threading.Event()
        self._gen = self._run()

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def last_seq(self) -> int:
        return self._state.last_seq

    @property
    def finish_reason(self) -> str | None:
        return self._state.completion.finish_reason if self._state.completion else None

    @property
    def usage(self):
        return self._state.completion.usage if self._state.completion else None

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> Chunk:
        return next(self._gen)

    def completion(self) -> Completion:
        """Consume the rest of the stream and return the whole result."""
        for _ in self:
            pass
        if self._state.completion is None:
            raise SplitServeError("the stream was cancelled before the request finished", "CANCELLED",
                                  request_id=self.request_id)
        return self._state.completion

    def close(self) -> None:
        self._gen.close()
        self._state.done = True                 # (a stream never iterated sent nothing, so aborts nothing)

    def cancel(self) -> None:
        self._cancelled.set()
        call = self._call
        if call is not None:
            call.cancel()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> Iterator[Chunk]:
        c, s = self._client, self._state
        error: SplitServeError | None = None
        try:
            while not s.done and not self._cancelled.is_set():
                self._call = self._open()
                try:
                    for resp in self._call:
                        yield from s.accept(resp)
                        if s.done:
                            return
                    drop = None                 # ended without Complete: the connection was cut
                except grpc.RpcError as e:
                    if self._cancelled.is_set():
                        return
                    drop = e
                time.sleep(s.on_drop(drop, c.max_retries))
                self._wait_for_server()
        except SplitServeError as e:
            error = e
            raise
        finally:
            if not s.done:
                self._finish_early(error)

    def _wait_for_server(self) -> None:
        c, s = self._client, self._state
        timeout = min(c.reconnect_timeout, s.remaining() if s.deadline is not None else c.reconnect_timeout)
        try:
            grpc.channel_ready_future(c._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            pass                          # the next call fails UNAVAILABLE and counts as a retry

    def _open(self):
        c, s = self._client, self._state
        if s.resuming or self._request is None:
            return c._stub.Resume(s.resume_request(), timeout=s.remaining(), metadata=c._metadata)
        return c._stub.Generate(self._request, timeout=s.remaining(), metadata=c._metadata)

    def _finish_early(self, error: SplitServeError | None) -> None:
        s = self._state
        if s.done:
            return
        s.done = True
        call = self._call
        if call is not None:
            call.cancel()
        if error is None or error.code not in NO_ABORT_CODES:
            self._client._abort_quietly(s.request_id)


def _pick(timeout: float | None, client) -> float | None:
    return timeout if timeout is not None else client.timeout
