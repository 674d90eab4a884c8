"""Shared by the tests that run splitserve on deploy/ray/local_cluster.py (a plain module, imported by name)."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx

from deploy_helpers import REPO

from splitserve.ports import free_port  # noqa: F401 - the tests import it from here

LAUNCHER = REPO / "deploy" / "ray" / "local_cluster.py"
MODEL = "SmolLM2-135M-Instruct.Q4_1"
# Small and exact: float32 on CPU, so a request re-placed after a fault continues with the fault-free tokens.
# Node loss is noticed through Ray (the launcher's --health-check-ms); the heartbeat timeout is long because on a
# loaded 2-core machine a busy but healthy worker can take more than the default 10 s to answer one.
SERVE_ARGS = ("--host", "127.0.0.1", "--dtype", "float32", "--kv-cache-gb", "0.25", "--local-prefill-threshold", "8",
              "--heartbeat-timeout", "60")

# A fresh driver's view of the cluster: totals, what is free, and this cluster's actors and placement groups
# that are not dead / removed (Ray's state API needs the dashboard, which the launcher leaves out).
STATE = r"""
import json, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
actors = [a["Name"] or a["ActorID"] for a in ray._private.state.actors().values() if a["State"] != "DEAD"]
pgs = [pg for pg, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"]
print("STATE", json.dumps({"total": ray.cluster_resources(), "available": ray.available_resources(),
                           "actors": actors, "placement_groups": pgs}), flush=True)
"""


def launcher_module() -> SimpleNamespace:
    return SimpleNamespace(**runpy.run_path(str(LAUNCHER)))


def launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCHER), *args], capture_output=True, text=True, timeout=timeout)


def cluster_env(cluster_dir: Path) -> dict[str, str]:
    """The variables the launcher's env file tells a user to source."""
    words = (cluster_dir / "env").read_text().split()
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}  # it would override the token file
    return {**env, **dict(w.split("=", 1) for w in words[1:])}


def cluster_state(cluster_dir: Path) -> dict:
    address = json.loads((cluster_dir / "cluster.json").read_text())["address"]
    out = subprocess.run([sys.executable, "-c", STATE, address], env=cluster_env(cluster_dir), capture_output=True,
                         text=True, timeout=60)
    for line in out.stdout.splitlines():
        if line.startswith("STATE "):
            return json.loads(line[len("STATE "):])
    raise AssertionError(f"the state driver failed ({out.returncode}):\n{out.stderr[-3000:]}")


def node_of_pid(cluster_dir: Path) -> dict[int, str]:
    """pid -> node name, from the environment marker every process of a node inherits (workers included)."""
    lc = launcher_module()
    names = [n["name"] for n in json.loads((cluster_dir / "cluster.json").read_text())["nodes"]]
    return {pid: name for name in names for pid, _ in lc.node_processes(cluster_dir, name)}


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line names the cluster dir (raylets, GCS, agents do): a check of `stop`
    that does not rely on the launcher's own environment marker. Zombies have an empty command line."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not healthy after {timeout}s:\n{log.read_text()[-4000:]}")


def interrupt(proc: subprocess.Popen, timeout: float) -> int | None:
    """Ctrl-C; the exit status, or None (and SIGKILL) if it did not exit in time."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter or gauge over the series that carry `labels`."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        head = line.split(" ")[0]
        if (head.split("{")[0] in (name, name + "_total") and not line.startswith("#")
                and all(f'{k}="{v}"' in head for k, v in labels.items())):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextmanager
def cluster_dir():
    # Short: Ray puts Unix sockets under it and socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="ssmn-", dir="/tmp"))
    try:
        yield path
    finally:
        launch("stop", "--dir", str(path))  # whatever the test did, nothing of this cluster survives it
        shutil.rmtree(path, ignore_errors=True)
