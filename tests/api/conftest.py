"""Fixtures for the API tests: one real SmolLM2 engine for the session, servers per module, a cuttable TCP proxy.

The engine loads once; each test module starts its own `EngineService` (the only thread stepping the engine)
and its HTTP + gRPC front ends on free ports, on an event loop in a background thread, so blocking clients
(openai, the sync SDK) can call them from the test thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.engine_service import EngineService
from splitserve.router.frontends import FrontendOptions, Frontends

TEXT_PROMPT = "Hello, my name is"
CHAT_PROMPT = "What is the capital of France?"
MAX_TOKENS = 8


@dataclass
class Engine:
    engine: LLMEngine
    text_ids: list[int]
    chat_ids: list[int]
    text_expected: str          # greedy, MAX_TOKENS, from engine.generate (the reference)
    chat_expected: str


@pytest.fixture(scope="session")
def engine() -> Engine:
    # One torch thread: on a small, busy CI machine extra threads only fight over the cores (10x slower decode).
    torch.set_num_threads(1)
    e = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=96, max_num_seqs=16, verbose=False))
    text_ids, chat_ids = e.encode_prompt(TEXT_PROMPT), e.encode_prompt(CHAT_PROMPT, chat=True)
    text, chat = e.generate([text_ids, chat_ids], SamplingParams(max_tokens=MAX_TOKENS))
    return Engine(e, text_ids, chat_ids, text.text, chat.text)


class ServerThread:
    """Front ends for one service on an event loop in a daemon thread."""

    def __init__(self, service, **options) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-test-server", daemon=True)
        self.thread.start()
        self.frontends = Frontends(service, FrontendOptions(http_host="127.0.0.1", http_port=0, grpc_port=0,
                                                            **options))
        self.run(self.frontends.start())
        self.http_port, self.grpc_port = self.frontends.http_port, self.frontends.grpc_port
        scheme = "https" if options.get("tls_cert") else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.frontends.stop(grace_s=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_service(engine: Engine) -> EngineService:
    return EngineService(engine.engine)


def close_service(service: EngineService) -> None:
    asyncio.run(service.close())


@pytest.fixture(scope="module")
def service(engine):
    svc = start_service(engine)
    yield svc
    close_service(svc)


@pytest.fixture(scope="module")
def server(service):
    s = ServerThread(service)
    yield s
    s.stop()


def wait_for_free_blocks(engine: LLMEngine, baseline: int, timeout: float = 30.0) -> int:
    """Poll until the engine's free KV blocks are back to `baseline`; returns the last count seen."""
    deadline = time.monotonic() + timeout
    while True:
        free = engine.block_manager.num_free_blocks
        if free >= baseline or time.monotonic() > deadline:
            return free
        time.sleep(0.05)


def wait_until_running(service: EngineService, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while service.load().num_running == 0:
        assert time.monotonic() < deadline, "no request started running"
        time.sleep(0.02)


class CuttableProxy:
    """A TCP proxy to `target_port` whose `cut()` drops every open connection (a network failure), while it
    keeps accepting new ones."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.cut()
