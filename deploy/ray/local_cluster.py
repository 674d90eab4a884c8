#!/usr/bin/env python3
"""A multi-node Ray cluster on one machine, for development and fault tests.

    python3 deploy/ray/local_cluster.py start --prefill 1 --decode 1   # prints the address
    python3 deploy/ray/local_cluster.py status
    python3 deploy/ray/local_cluster.py stop --node decode-0            # SIGKILL one node (fault test)
    python3 deploy/ray/local_cluster.py stop                            # everything
    python3 deploy/ray/local_cluster.py start --serve -- --model /models/x --device cpu

Every node is a separate `ray start` on loopback (127.0.0.2, see NODE_IP) with its own temp dir, node name and
ports, and carries the custom resource its role needs (`splitserve_prefill` / `splitserve_decode`), exactly like
a worker pod of the Helm chart. Ray token auth is on: a fresh token is written to <dir>/auth_token and every
process gets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH.

`ray stop` would kill every Ray process on the machine, including other people's clusters, so each node's
processes are stamped with the environment variable SPLITSERVE_LOCAL_NODE=<dir>::<node>. Environment is
inherited by the daemons `ray start` spawns and by the workers the raylet forks, and /proc/PID/environ survives
Ray's process renaming (`ray::IDLE`), so `stop` finds exactly this cluster's processes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from splitserve.ports import free_port

MARK = "SPLITSERVE_LOCAL_NODE"
ROLE_RESOURCE = {"prefill": "splitserve_prefill", "decode": "splitserve_decode"}
# Loopback, but not 127.0.0.1: `ray start` rewrites that literal address (and only it) to the machine's routable
# IP. Any 127.x address stays on the loopback interface, so no traffic of this cluster leaves the machine.
NODE_IP = "127.0.0.2"
# Unix socket paths are limited to 107 bytes and Ray nests several directories under the temp dir: keep it short.
DEFAULT_DIR = "/tmp/splitserve-lc"


def ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")  # the ray of this interpreter, not a pyenv shim's choice
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def node_env(cluster_dir: Path, name: str, health_check_ms: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if health_check_ms:  # Ray's default (3 s x 5 misses) takes ~15 s to declare a killed node dead
        env["RAY_health_check_period_ms"] = str(health_check_ms)
    env[MARK] = f"{cluster_dir}::{name}"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(cluster_dir / "auth_token")
    env.pop("RAY_AUTH_TOKEN", None)  # would take precedence over the token file
    env.pop("RAY_ADDRESS", None)
    return env


def node_args(name: str, cluster_dir: Path, cpus: int, resources: dict, object_store_mb: int) -> list[str]:
    # Fixed default ports (dashboard agent 52365, client server 10001) collide between nodes: pick free ones.
    return [
        f"--node-ip-address={NODE_IP}", f"--node-name={name}", f"--temp-dir={cluster_dir / name}",
        f"--num-cpus={cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
        f"--dashboard-agent-listen-port={free_port(NODE_IP)}", f"--dashboard-agent-grpc-port={free_port(NODE_IP)}",
        f"--runtime-env-agent-port={free_port(NODE_IP)}", f"--metrics-export-port={free_port(NODE_IP)}",
        "--disable-usage-stats",
    ]


def run_ray_start(cluster_dir: Path, name: str, cmd: list[str], health_check_ms: int | None,
                  attempts: int = 2) -> None:
    """`ray start` gives a node a fixed 30 s to register with the GCS, which a loaded machine can miss: on
    failure this node's half-started processes are killed and it is started once more."""
    log = cluster_dir / f"{name}.start.log"  # the daemons inherit it too, so their stray output lands here
    for attempt in range(attempts):
        with log.open("a" if attempt else "w") as out:
            env = node_env(cluster_dir, name, health_check_ms)
            code = subprocess.run(cmd, env=env, stdout=out, stderr=out).returncode
        if code == 0:
            return
        stop_node(cluster_dir, name, grace=2)
    stop_all(cluster_dir)
    raise SystemExit(f"`ray start` for node {name} failed ({code}):\n" + log.read_text()[-3000:])


def node_processes(cluster_dir: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(pid, comm) of live processes stamped with this cluster (and node, when given)."""
    prefix = f"{MARK}={cluster_dir}::".encode()
    exact = f"{MARK}={cluster_dir}::{name}".encode() if name else None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # already dead, waiting to be reaped
            continue
        if any(v == exact if exact else v.startswith(prefix) for v in env):
            found.append((int(entry.name), comm))
    return found


def signal_all(procs: list[tuple[int, str]], sig: int) -> None:
    for pid, _ in procs:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_gone(cluster_dir: Path, name: str | None, timeout: float) -> list[tuple[int, str]]:
    end = time.monotonic() + timeout
    while (left := node_processes(cluster_dir, name)) and time.monotonic() < end:
        time.sleep(0.2)
    return left


def kill_node(cluster_dir: Path, name: str) -> None:
    """Abrupt node loss: SIGKILL the raylet first (the moment the node is lost), then everything else."""
    procs = node_processes(cluster_dir, name)
    if not procs:
        raise SystemExit(f"no live processes for node {name!r} in {cluster_dir}")
    signal_all([p for p in procs if p[1] == "raylet"], signal.SIGKILL)
    signal_all(procs, signal.SIGKILL)
    if left := wait_gone(cluster_dir, name, 10):
        raise SystemExit(f"node {name!r} still has processes: {left}")


def stop_node(cluster_dir: Path, name: str | None, grace: float) -> None:
    signal_all(node_processes(cluster_dir, name), signal.SIGTERM)
    if left := wait_gone(cluster_dir, name, grace):
        signal_all(left, signal.SIGKILL)
        if left := wait_gone(cluster_dir, name, 5):
            raise SystemExit(f"processes survived SIGKILL: {left}")


def stop_all(cluster_dir: Path, grace: float = 2) -> None:
    """Workers first, so that their raylets can still unregister with the GCS. The GCS itself can spend 15 s
    flushing metrics on SIGTERM; its state is in memory and thrown away anyway, so the grace period is short."""
    state = cluster_dir / "cluster.json"
    names = [n["name"] for n in json.loads(state.read_text())["nodes"]] if state.exists() else []
    for name in [n for n in names if n != "head"] + ["head"]:
        stop_node(cluster_dir, name, grace)
    stop_node(cluster_dir, None, grace)  # anything left, e.g. from a start that failed half-way


def wait_alive(address: str, cluster_dir: Path, expected: int, timeout: float) -> list[dict]:
    """Connect as a driver and wait until every node has registered with the GCS."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        os.environ[key] = node_env(cluster_dir, "driver")[key]
    os.environ.pop("RAY_AUTH_TOKEN", None)
    import ray  # imported late: `stop` must work without paying for it

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        end = time.monotonic() + timeout
        while len(alive := [n for n in ray.nodes() if n["Alive"]]) < expected and time.monotonic() < end:
            time.sleep(0.2)
        if len(alive) < expected:
            raise SystemExit(f"only {len(alive)} of {expected} nodes registered within {timeout}s")
        return alive
    finally:
        ray.shutdown()


def start(a: argparse.Namespace) -> int:
    cluster_dir = Path(a.dir).resolve()
    if node_processes(cluster_dir):
        raise SystemExit(f"a cluster is already running in {cluster_dir}; run `stop` first")
    shutil.rmtree(cluster_dir, ignore_errors=True)
    cluster_dir.mkdir(parents=True)
    token = cluster_dir / "auth_token"
    token.write_text(secrets.token_hex(32))  # same form as `ray get-auth-token --generate`
    token.chmod(0o600)
    port = a.port or free_port(NODE_IP)
    address = f"{NODE_IP}:{port}"
    ray = ray_cli()

    head = [ray, "start", "--head", f"--port={port}", f"--ray-client-server-port={free_port(NODE_IP)}",
            "--include-dashboard=false",
            *node_args("head", cluster_dir, a.head_cpus, {"splitserve_router": 1}, a.object_store_mb)]
    workers = [(f"{role}-{i}", role) for role, n in (("prefill", a.prefill), ("decode", a.decode)) for i in range(n)]
    nodes = [{"name": "head", "role": "head"}] + [{"name": n, "role": r} for n, r in workers]
    # Written first, so that `stop` can clean up after a start that fails half-way.
    (cluster_dir / "cluster.json").write_text(json.dumps({"address": address, "nodes": nodes}, indent=1))
    run_ray_start(cluster_dir, "head", head, a.health_check_ms)
    # One at a time: on 2 cores starting them together is slower (the cost is Python start-up, not waiting).
    for name, role in workers:
        run_ray_start(cluster_dir, name, [ray, "start", f"--address={address}", *node_args(
            name, cluster_dir, a.worker_cpus, {ROLE_RESOURCE[role]: 1}, a.object_store_mb)], a.health_check_ms)
    (cluster_dir / "env").write_text(f"export RAY_ADDRESS={address} RAY_AUTH_MODE=token "
                                     f"RAY_AUTH_TOKEN_PATH={token}\n")
    try:
        wait_alive(address, cluster_dir, len(nodes), a.timeout)
    except BaseException:
        stop_all(cluster_dir)
        raise
    print(address, flush=True)
    print(f"# source {cluster_dir / 'env'} to use it; stop with: {sys.argv[0]} stop --dir {cluster_dir}",
          file=sys.stderr)
    if not a.serve:
        return 0
    serve = [*splitserve_cli(), "serve", "--address", address, "--prefill-workers", str(a.prefill),
             "--decode-workers", str(a.decode), *a.serve_args]
    try:  # the cluster lives as long as the server: Ctrl-C stops both, the server first
        return run_server(serve, node_env(cluster_dir, "driver"))
    finally:
        stop_all(cluster_dir)


def splitserve_cli() -> list[str]:
    beside = Path(sys.executable).with_name("splitserve")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "splitserve.cli"]


def run_server(cmd: list[str], env: dict[str, str]) -> int:
    """Run `splitserve serve` until it exits and return its exit status. Ctrl-C and SIGTERM are passed on to it
    as SIGINT, so it drains, removes its workers and exits 0 before the cluster goes. It runs in its own session,
    so a terminal's Ctrl-C reaches it once (through here), not twice (a second one cuts its drain short)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:   # only if waiting itself failed
            proc.kill()
            proc.wait()


def status(a: argparse.Namespace) -> int:
    cluster_dir = Path(a.dir).resolve()
    info = json.loads((cluster_dir / "cluster.json").read_text())
    print(info["address"])
    for node in info["nodes"]:
        pids = sorted(pid for pid, _ in node_processes(cluster_dir, node["name"]))
        print(f"{node['name']:12} {node['role']:8} {'up' if pids else 'down'} {len(pids)} processes")
    return 0


def stop(a: argparse.Namespace) -> int:
    cluster_dir = Path(a.dir).resolve()
    if a.node:
        kill_node(cluster_dir, a.node)
    else:
        stop_all(cluster_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start head + prefill/decode worker nodes and print the address")
    s.add_argument("--prefill", type=int, default=1, help="prefill nodes (resource splitserve_prefill)")
    s.add_argument("--decode", type=int, default=1, help="decode nodes (resource splitserve_decode)")
    s.add_argument("--port", type=int, default=0, help="GCS port (default: a free one)")
    s.add_argument("--head-cpus", type=int, default=1)
    s.add_argument("--worker-cpus", type=int, default=1)
    s.add_argument("--object-store-mb", type=int, default=256, help="per node (Ray's default is 30%% of RAM)")
    s.add_argument("--health-check-ms", type=int, help="GCS health-check period; a node is dead after 5 misses")
    s.add_argument("--timeout", type=float, default=60, help="seconds to wait for all nodes to register")
    s.add_argument("--serve", action="store_true", help="then run `splitserve serve` against it (args after --)")
    s.add_argument("serve_args", nargs="*", help="extra `splitserve serve` arguments, after --")
    s.set_defaults(func=start)
    t = sub.add_parser("status", help="print the address and which nodes have live processes")
    t.set_defaults(func=status)
    k = sub.add_parser("stop", help="stop the whole cluster, or SIGKILL one node with --node")
    k.add_argument("--node", help="node name (head, prefill-0, decode-1, ...): SIGKILL its raylet and processes")
    k.set_defaults(func=stop)
    for q in (s, t, k):
        q.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster state and temp dirs (default {DEFAULT_DIR})")
    a = p.parse_args(argv)
    if a.command == "start" and min(a.prefill, a.decode) < 0:
        p.error("--prefill and --decode must be >= 0")
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
