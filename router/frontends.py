"""Starting the HTTP (uvicorn) and gRPC front ends together on one asyncio loop, around one `GenerationService`.

    frontends = Frontends(service, FrontendOptions(http_port=8000, grpc_port=50051, api_key=key))
    await frontends.start()          # both bound (port 0 = any free port; see .http_port / .grpc_port)
    ...
    await frontends.stop()

or `await serve_frontends(service, ...)`, which runs until cancelled. TLS (`tls_cert` + `tls_key`, PEM files)
applies to both: HTTPS and a TLS gRPC port. Signals are left to the caller (the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import GrpcAuthInterceptor
from .grpc_api import SERVICE_NAME, add_generation_service
from .http_api import create_app
from .http_errors import DEFAULT_MAX_BODY_BYTES
from .metrics import Metrics
from .service import GenerationService

log = logging.getLogger(__name__)


@dataclass(slots=True)
class FrontendOptions:
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_host: str | None = None          # None = http_host
    grpc_port: int = 50051
    api_key: str | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "warning"

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 <= port < 65536:
                raise ValueError(f"{name} must be in [0, 65535], got {port!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} is not a file")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):        # the CLI owns signals; stop() ends the server
        yield


class Frontends:
    def __init__(self, service: GenerationService, options: FrontendOptions | None = None,
                 metrics: Metrics | None = None) -> None:
        self.service = service
        self.options = options or FrontendOptions()
        self.metrics = metrics or getattr(service, "metrics", None) or Metrics(service.model_name)
        self.app = create_app(service, self.metrics, self.options.api_key, self.options.max_body_bytes)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._health: health.aio.HealthServicer | None = None
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._start_grpc()
        try:
            await self._start_http()
        except BaseException:
            await self._grpc.stop(0)
            raise
        scheme = "https" if self.options.tls else "http"
        log.info("serving %s on %s://%s:%d and gRPC on port %d", self.service.model_name, scheme,
                 self.options.http_host, self.http_port, self.grpc_port)

    async def _start_grpc(self) -> None:
        o = self.options
        interceptors = [GrpcAuthInterceptor(o.api_key)] if o.api_key else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", o.max_body_bytes), ("grpc.so_reuseport", 0),
            # the SDK pings every 30 s during long streams; accept that instead of answering with GOAWAY
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000)])
        add_generation_service(server, self.service)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{o.grpc_host or o.http_host}:{o.grpc_port}"
        if o.tls:
            creds = grpc.ssl_server_credentials([(Path(o.tls_key).read_bytes(), Path(o.tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        if not port:
            raise OSError(f"cannot bind the gRPC port {address}")
        await server.start()
        self._grpc, self.grpc_port = server, port
        await self._set_health(True)
        self._health_task = asyncio.get_running_loop().create_task(self._track_health())

    async def _set_health(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _track_health(self, every_s: float = 1.0) -> None:
        """Mirror the service's `healthy` (when it has one) into grpc.health.v1, as /health does for HTTP."""
        last = True
        while True:
            await asyncio.sleep(every_s)
            ok = getattr(self.service, "healthy", True) is not False
            if ok != last:
                await self._set_health(ok)
                last = ok

    async def _start_http(self) -> None:
        o = self.options
        family = socket.AF_INET6 if ":" in o.http_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((o.http_host, o.http_port))
        sock.set_inheritable(True)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, host=o.http_host, port=self.http_port, log_level=o.log_level,
                                lifespan="off", access_log=False, timeout_graceful_shutdown=5,
                                ssl_certfile=str(o.tls_cert) if o.tls else None,
                                ssl_keyfile=str(o.tls_key) if o.tls else None)
        self._http = _Uvicorn(config)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()          # raises what stopped it
                raise OSError(f"the HTTP server on {o.http_host}:{self.http_port} stopped while starting")
            await asyncio.sleep(0.02)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._http is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._http_task), grace_s + 1)
            if not self._http_task.done():
                self._http.force_exit = True
                self._http_task.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace_s)

    async def wait(self) -> None:
        """Until the HTTP server stops (or this is cancelled)."""
        if self._http_task is not None:
            await asyncio.shield(self._http_task)


async def serve_frontends(service: GenerationService, http_host: str = "0.0.0.0", http_port: int = 8000,
                          grpc_port: int = 50051, api_key: str | None = None, tls_cert: str | Path | None = None,
                          tls_key: str | Path | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                          metrics: Metrics | None = None, grpc_host: str | None = None) -> None:
    """Serve HTTP and gRPC until cancelled (or the HTTP server exits), then stop both."""
    frontends = Frontends(service, FrontendOptions(http_host=http_host, http_port=http_port, grpc_host=grpc_host,
                                                   grpc_port=grpc_port, api_key=api_key, tls_cert=tls_cert,
                                                   tls_key=tls_key, max_body_bytes=max_body_bytes), metrics)
    await frontends.start()
    try:
        await frontends.wait()
    finally:
        await frontends.stop()
