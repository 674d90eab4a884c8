"""The asyncio gRPC client: the same methods and results as `Client`, awaited.

    async with AsyncClient("localhost:50051") as client:
        completion = await client.generate("The capital of France is", max_tokens=16)
        async with client.stream("Once upon a time", max_tokens=32) as chunks:
            async for chunk in chunks:
                print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.proto.v1 import api_pb2 as pb
from splitserve.proto.v1 import api_pb2_grpc

from ._common import (ABORT_TIMEOUT_S, CHANNEL_OPTIONS, NO_ABORT_CODES, StreamState, build_request,
                      channel_credentials, deadline_after, metadata, to_load_info, to_model_info)
from .errors import SplitServeError, from_rpc_error
from .sync_client import SERVICE_NAME
from .types import Chunk, Completion, LoadInfo, ModelInfo


class AsyncClient:
    """Arguments as for `Client`. Create it inside the event loop that uses it."""

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, tls: bool | None = None,
                 root_certificates: bytes | str | None = None, timeout: float | None = None, max_retries: int = 3,
                 reconnect_timeout: float = 30.0, channel_options: list[tuple[str, object]] | None = None) -> None:
        creds = channel_credentials(tls, root_certificates)
        options = CHANNEL_OPTIONS + list(channel_options or [])
        self._channel = (grpc.aio.secure_channel(target, creds, options) if creds is not None
                         else grpc.aio.insecure_channel(target, options))
        self._stub = api_pb2_grpc.GenerationStub(self._channel)
        self._metadata = metadata(api_key)
        self.timeout, self.max_retries, self.reconnect_timeout = timeout, max_retries, reconnect_timeout

    async def generate(self, prompt: str | Sequence[int] | None = None, *, messages: list[dict] | None = None,
                       request_id: str | None = None, model: str | None = None, timeout: float | None = None,
                       **sampling) -> Completion:
        async with self.stream(prompt, messages=messages, request_id=request_id, model=model, timeout=timeout,
                               **sampling) as chunks:
            return await chunks.completion()

    def stream(self, prompt: str | Sequence[int] | None = None, *, messages: list[dict] | None = None,
               request_id: str | None = None, model: str | None = None, timeout: float | None = None,
               **sampling) -> AsyncChunkStream:
        """An async iterator of `Chunk`s; `aclose()`, leaving `async with`, or cancelling the consuming task
        before the end aborts the request."""
        request = build_request(prompt, messages, request_id, model, sampling)
        return AsyncChunkStream(self, request, StreamState(request.request_id, deadline_after(_pick(timeout, self))))

    def resume(self, request_id: str, last_seq: int = 0, *, timeout: float | None = None) -> AsyncChunkStream:
        state = StreamState(request_id, deadline_after(_pick(timeout, self)), last_seq=last_seq, resuming=True,
                            can_submit=False)
        return AsyncChunkStream(self, None, state)

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        return (await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout)).aborted

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return to_model_info(await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    async def load(self, *, timeout: float | None = None) -> LoadInfo:
        return to_load_info(await self._unary(self._stub.GetLoad, pb.GetLoadRequest(), timeout))

    async def health(self, *, timeout: float | None = 5.0) -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        except grpc.RpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _unary(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=_pick(timeout, self), metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=ABORT_TIMEOUT_S,
                                   metadata=self._metadata)
        except (Exception, asyncio.CancelledError):   # best effort: the channel may be down or closed
            pass


class AsyncChunkStream:
    """A request's chunks, as an async iterator; `finish_reason` and `usage` are set after the last one."""

    def __init__(self, client: AsyncClient, request: pb.GenerateRequest | None, state: StreamState) -> None:
        self._client, self._request, self._state = client, request, state
        self._call = None
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

    def __aiter__(self) -> AsyncChunkStream:
        return self

    async def __anext__(self) -> Chunk:
        return await self._gen.__anext__()

    async def completion(self) -> Completion:
        async for _ in self:
            pass
        if self._state.completion is None:
            raise SplitServeError("the stream was closed before the request finished", "CANCELLED",
                                  request_id=self.request_id)
        return self._state.completion

    async def aclose(self) -> None:
        await self._gen.aclose()
        self._state.done = True

    async def __aenter__(self) -> AsyncChunkStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _run(self) -> AsyncIterator[Chunk]:
        c, s = self._client, self._state
        error: SplitServeError | None = None
        try:
            while not s.done:
                self._call = self._open()
                try:
                    async for resp in self._call:
                        for chunk in s.accept(resp):
                            yield chunk
                        if s.done:
                            return
                    drop = None                 # ended without Complete: the connection was cut
                except grpc.RpcError as e:
                    drop = e
                await asyncio.sleep(s.on_drop(drop, c.max_retries))
                await self._wait_for_server()
        except SplitServeError as e:
            error = e
            raise
        finally:
            if not s.done:
                s.done = True
                if self._call is not None:
                    self._call.cancel()
                if error is None or error.code not in NO_ABORT_CODES:
                    await asyncio.shield(c._abort_quietly(s.request_id))

    async def _wait_for_server(self) -> None:
        c, s = self._client, self._state
        timeout = min(c.reconnect_timeout, s.remaining() if s.deadline is not None else c.reconnect_timeout)
        try:
            await asyncio.wait_for(c._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            pass                          # the next call fails UNAVAILABLE and counts as a retry

    def _open(self):
        c, s = self._client, self._state
        if s.resuming or self._request is None:
            return c._stub.Resume(s.resume_request(), timeout=s.remaining(), metadata=c._metadata)
        return c._stub.Generate(self._request, timeout=s.remaining(), metadata=c._metadata)


def _pick(timeout: float | None, client) -> float | None:
    return timeout if timeout is not None else client.timeout
