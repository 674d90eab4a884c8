"""deploy/ray/local_cluster.py: a real multi-node Ray cluster on loopback, with token auth, that loses a node
when told to and leaves no process behind when stopped."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from deploy_helpers import REPO
from local_cluster_helpers import processes_mentioning

LAUNCHER = REPO / "deploy" / "ray" / "local_cluster.py"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

# A driver that reports the cluster, waits to be told which node was killed, then waits until Ray agrees.
# Its reports are tagged: Ray prints its own notices (e.g. "Raylet is terminated") to the driver's stdout.
DRIVER = r"""
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
def nodes():
    return {n["NodeName"]: {"alive": n["Alive"], "resources": n["Resources"], "ip": n["NodeManagerAddress"]}
            for n in ray.nodes()}
print("NODES", json.dumps(nodes()), flush=True)
victim = sys.stdin.readline().strip()
deadline = time.monotonic() + 30
while nodes()[victim]["alive"] and time.monotonic() < deadline:
    time.sleep(0.2)
print("NODES", json.dumps(nodes()), flush=True)
"""


def read_nodes(driver: subprocess.Popen) -> dict:
    for line in driver.stdout:
        if line.startswith("NODES "):
            return json.loads(line[len("NODES "):])
    raise AssertionError(f"the driver exited ({driver.wait()}) without reporting the nodes")


def launcher_module() -> SimpleNamespace:
    # run_path, not an import: deploy/ray is not a package, and no __pycache__ is left in it.
    return SimpleNamespace(**runpy.run_path(str(LAUNCHER)))


def launch(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCHER), *args], capture_output=True, text=True, timeout=timeout)


def cluster_env(cluster_dir: Path) -> dict[str, str]:
    """The variables the launcher's env file tells a user to source."""
    words = (cluster_dir / "env").read_text().split()
    assert words[0] == "export"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}  # it would override the token file
    return {**env, **dict(w.split("=", 1) for w in words[1:])}


def gcs_cluster_id(address: str, token: str | None) -> grpc.StatusCode:
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


@pytest.fixture
def cluster_dir():
    # Short: Ray puts Unix sockets under it and socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="sslc-", dir="/tmp"))
    yield path
    launch("stop", "--dir", str(path))   # whatever the test did, nothing of this cluster survives it
    shutil.rmtree(path, ignore_errors=True)


def test_head_and_two_workers_lose_a_node_and_stop_cleanly(cluster_dir):
    lc = launcher_module()
    d = str(cluster_dir)
    started = launch("start", "--prefill", "1", "--decode", "1", "--dir", d, "--health-check-ms", "300")
    assert started.returncode == 0, started.stderr[-3000:]
    address = started.stdout.strip()
    assert address.startswith("127.0.0.")
    assert address == json.loads((cluster_dir / "cluster.json").read_text())["address"]

    # Token auth: the GCS refuses a caller without the cluster's token, or with a wrong one.
    token = (cluster_dir / "auth_token").read_text().strip()
    assert gcs_cluster_id(address, None) == grpc.StatusCode.UNAUTHENTICATED
    assert gcs_cluster_id(address, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
    assert gcs_cluster_id(address, token) == grpc.StatusCode.OK

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, address], env=cluster_env(cluster_dir),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        before = read_nodes(driver)
        assert sorted(before) == ["decode-0", "head", "prefill-0"]
        assert all(n["alive"] and n["ip"].startswith("127.") for n in before.values()), before
        assert before["prefill-0"]["resources"]["splitserve_prefill"] == 1
        assert before["decode-0"]["resources"]["splitserve_decode"] == 1
        assert "splitserve_decode" not in before["prefill-0"]["resources"]
        assert not {"splitserve_prefill", "splitserve_decode"} & before["head"]["resources"].keys()

        raylet = [pid for pid, comm in lc.node_processes(cluster_dir, "decode-0") if comm == "raylet"]
        assert len(raylet) == 1
        killed = launch("stop", "--node", "decode-0", "--dir", d)
        assert killed.returncode == 0, killed.stderr
        assert not lc.node_processes(cluster_dir, "decode-0")
        assert lc.node_processes(cluster_dir, "prefill-0") and lc.node_processes(cluster_dir, "head")

        driver.stdin.write("decode-0\n")
        driver.stdin.flush()
        after = read_nodes(driver)
        assert not after["decode-0"]["alive"], "Ray never noticed the killed node"
        assert after["head"]["alive"] and after["prefill-0"]["alive"]
    finally:
        driver.kill()
        driver.wait()

    status = launch("status", "--dir", d)
    rows = {line.split()[0]: line.split()[2] for line in status.stdout.splitlines()[1:]}
    assert rows == {"head": "up", "prefill-0": "up", "decode-0": "down"}
    assert launch("stop", "--node", "no-such-node", "--dir", d).returncode != 0

    stopped = launch("stop", "--dir", d)
    assert stopped.returncode == 0, stopped.stderr
    assert not lc.node_processes(cluster_dir)
    assert not processes_mentioning(d)
