"""`serve_frontends` / `Frontends`: both servers come up together, stop together, and bad options are refused."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from splitserve.client import AsyncClient
from splitserve.router.frontends import FrontendOptions, serve_frontends


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_frontends_runs_until_cancelled(service):
    http_port, grpc_port = _free_port(), _free_port()

    async def main():
        task = asyncio.create_task(serve_frontends(service, "127.0.0.1", http_port, grpc_port))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
            for _ in range(200):
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            models = (await http.get("/v1/models")).json()
        async with AsyncClient(f"127.0.0.1:{grpc_port}", timeout=30) as client:
            info = await client.model_info()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return models, info

    models, info = asyncio.run(main())
    assert models["data"][0]["id"] == info.name == service.model_name
    with socket.create_server(("127.0.0.1", http_port)):     # both ports were released
        pass
    with socket.create_server(("127.0.0.1", grpc_port)):
        pass


@pytest.mark.parametrize("kwargs,field", [(dict(http_port=70000), "http_port"), (dict(grpc_port=-1), "grpc_port"),
                                          (dict(tls_cert="/nonexistent.pem"), "tls_cert"),
                                          (dict(tls_cert="/etc/hostname", tls_key="/nonexistent"), "tls_key"),
                                          (dict(max_body_bytes=0), "max_body_bytes")])
def test_bad_options(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FrontendOptions(**kwargs)
