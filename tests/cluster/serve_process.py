"""Run `splitserve serve` as a real subprocess on free ports, wait until it is healthy, stop it with SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import httpx

from splitserve.ports import free_port


class ServeProcess:
    def __init__(self, *args: str, timeout: float = 240.0, ports: tuple[int, int] | None = None) -> None:
        self.http_port, self.grpc_port = ports or (free_port(), free_port())
        cmd = [sys.executable, "-m", "splitserve.cli", "serve", "--host", "127.0.0.1",
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *args]
        self.log = open(f"/tmp/splitserve-serve-{self.http_port}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"serve not healthy after {timeout}s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def kill(self) -> None:
        """SIGKILL the router process alone (a crash): its workers die with it, as non-detached actors do."""
        self.proc.kill()
        self.proc.wait(30)

    def stop(self, timeout: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def workers(server: ServeProcess) -> list[dict]:
    return httpx.get(server.url + "/admin/workers", timeout=10).json()["workers"]


def stream_through_fault(server: ServeProcess, prompts: list[str], max_tokens: int, sampling: Callable[[int], dict],
                         fault: Callable[[], None], after_chunks: int, wait_s: float = 300) -> list[list | None]:
    """Stream every prompt concurrently over gRPC (ignore_eos); call `fault()` once each stream has
    `after_chunks` chunks. Returns each stream's chunks (None if it did not finish)."""
    from splitserve.client import Client

    results: list[list | None] = [None] * len(prompts)
    started = threading.Barrier(len(prompts) + 1)

    def one(i: int) -> None:
        with Client(f"127.0.0.1:{server.grpc_port}", timeout=300) as client:
            chunks = []
            with client.stream(messages=[{"role": "user", "content": prompts[i]}], max_tokens=max_tokens,
                               ignore_eos=True, **sampling(i)) as stream:
                for chunk in stream:
                    chunks.append(chunk)
                    if len(chunks) == after_chunks:
                        started.wait(wait_s)
            results[i] = chunks

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    started.wait(wait_s)
    fault()
    for t in threads:
        t.join(300)
    return results
