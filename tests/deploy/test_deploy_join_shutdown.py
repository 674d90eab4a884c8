"""`splitserve serve --address` on a Ray cluster it joined (deploy/ray/local_cluster.py): Ctrl-C during start-up,
or after serving while a replacement worker still waits for room, removes every actor and placement group the
server made (pending ones too), disconnects without stopping the cluster, and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from local_cluster_helpers import (MODEL, SERVE_ARGS, cluster_dir, cluster_env, cluster_state, free_port, interrupt,
                                   launch, wait_healthy)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
STATE_KEYS_THAT_MOVE = {"object_store_memory", "memory"}   # not ours to hand back: Ray's own bookkeeping


@pytest.fixture(scope="module")
def cluster():
    """A head and one decode node (1 CPU: room for exactly one worker of --cpus-per-worker 1)."""
    with cluster_dir() as d:
        started = launch("start", "--prefill", "0", "--decode", "1", "--dir", str(d), "--health-check-ms", "300")
        assert started.returncode == 0, started.stderr[-3000:]
        yield d


class Server:
    def __init__(self, d: Path, log: Path, *args: str) -> None:
        address = json.loads((d / "cluster.json").read_text())["address"]
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "splitserve.cli", "serve", "--address", address, *SERVE_ARGS,
                 "--http-port", str(self.http_port), "--grpc-port", str(free_port()), "--prefill-workers", "0", *args],
                env=cluster_env(d), stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        code = interrupt(self.proc, timeout=90)
        assert code == 0, f"exit status {code}:\n{self.log.read_text()[-4000:]}"


def wait_for_state(d: Path, ok, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = cluster_state(d)
        if ok(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def released(state: dict) -> bool:
    keys = (state["total"].keys() | state["available"].keys()) - STATE_KEYS_THAT_MOVE
    return (not state["actors"] and not state["placement_groups"]
            and all(state["available"].get(k) == state["total"].get(k) for k in keys))


def assert_released_and_cluster_up(d: Path) -> None:
    state = wait_for_state(d, released, timeout=30)
    assert released(state), state
    assert state["total"]["CPU"] == 2 and state["total"]["splitserve_decode"] == 1   # both nodes still there
    rows = {line.split()[0]: line.split()[2] for line in launch("status", "--dir", str(d)).stdout.splitlines()[1:]}
    assert rows == {"head": "up", "decode-0": "up"}


def test_ctrl_c_during_start_up(cluster, tmp_path):
    # Two decode workers on a cluster with room for one: start-up holds a loading actor and a pending
    # placement group, and would wait for room for minutes.
    server = Server(cluster, tmp_path / "serve.log", "--decode-workers", "2")
    try:
        state = wait_for_state(cluster, lambda s: len(s["placement_groups"]) == 2 and s["actors"], timeout=120)
        assert len(state["placement_groups"]) == 2 and state["actors"], (state, server.log.read_text()[-3000:])
        assert server.proc.poll() is None
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 60
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert "interrupted during start-up" in server.log.read_text()
    assert_released_and_cluster_up(cluster)


def add_decode_worker(url: str) -> None:
    try:
        httpx.post(url + "/admin/workers", json={"role": "decode"}, timeout=120)
    except httpx.HTTPError:   # the server stops while this waits: expected
        pass


def test_ctrl_c_while_a_replacement_waits_for_room(cluster, tmp_path):
    server = Server(cluster, tmp_path / "serve.log", "--decode-workers", "1")
    try:
        wait_healthy(server.url, server.proc, server.log, timeout=180)
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Name a prime number."}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        # a second decode worker has no room: its placement group stays pending while the server runs
        adding = threading.Thread(target=add_decode_worker, args=(server.url,), daemon=True)
        adding.start()
        state = wait_for_state(cluster, lambda s: len(s["placement_groups"]) == 2, timeout=60)
        assert len(state["placement_groups"]) == 2, state
        server.stop()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert "draining" in server.log.read_text()
    assert_released_and_cluster_up(cluster)
