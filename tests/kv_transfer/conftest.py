"""Helpers for multi-process kv_transfer tests: a rendezvous store in the test process and peer subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed import TCPStore

PEER = Path(__file__).with_name("kv_peer.py")


@pytest.fixture
def store():
    """The rendezvous store, hosted here as the router hosts it in production."""
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


class Peers:
    def __init__(self, store: TCPStore, tmp_path: Path) -> None:
        self.store, self.tmp = store, tmp_path
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, **args) -> None:
        args.setdefault("out", str(self.tmp / f"{name}.json"))
        args["store_port"] = self.store.port
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.procs[name] = subprocess.Popen([sys.executable, str(PEER), json.dumps(args)], env=env)

    def wait(self, timeout: float = 60) -> dict[str, dict]:
        deadline = time.time() + timeout
        results = {}
        for name, p in self.procs.items():
            rc = p.wait(timeout=max(1, deadline - time.time()))
            if rc in (-9,):
                continue
            assert rc == 0, f"peer {name} exited with {rc}"
            results[name] = json.loads((self.tmp / f"{name}.json").read_text())
        return results

    def wait_for_key(self, key: str, at_least: int = 1, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.store.check([key]) and int(self.store.get(key)) >= at_least:
                return
            time.sleep(0.01)
        raise TimeoutError(f"{key} never reached {at_least}")

    def kill(self, name: str) -> float:
        self.procs[name].kill()
        return time.time()

    def cleanup(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def peers(store, tmp_path):
    p = Peers(store, tmp_path)
    yield p
    p.cleanup()
