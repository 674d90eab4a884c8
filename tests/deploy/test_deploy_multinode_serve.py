"""`deploy/ray/local_cluster.py start --serve`, the documented way to run splitserve on a local multi-node Ray
cluster: a head, a prefill node and two decode nodes on loopback. Workers sit on their role's nodes, OpenAI
streams are served across nodes (KV from the prefill node to the decode nodes), a decode node is SIGKILLed
mid-stream and every stream still ends with exactly its fault-free text, and Ctrl-C stops server and cluster
(server exit 0) leaving no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from openai import OpenAI

from local_cluster_helpers import (LAUNCHER, MODEL, SERVE_ARGS, cluster_dir, free_port, interrupt, launch,
                                   launcher_module, metric, node_of_pid, processes_mentioning, wait_healthy)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]   # a loaded 2-core machine: Ray alone can take minutes

PROMPTS = ["Write a long story about a lighthouse keeper and a storm.",
           "Explain, step by step, how a bicycle gear system works.",
           "Describe a walk through a busy market in a city you imagine.",
           "List facts about the ocean, one per line."]
MAX_TOKENS = 32


def stream_all(client: OpenAI, on_progress=None) -> list[tuple[str, int]]:
    """Stream every prompt at once (greedy); (text, completion tokens) each. `on_progress` runs once every
    stream has received a few chunks, while all of them are still in flight."""
    results: list = [None] * len(PROMPTS)
    errors: list = []
    progress = threading.Barrier(len(PROMPTS) + 1, timeout=120)

    def one(i: int) -> None:
        try:
            parts, usage, chunks = [], None, 0
            for chunk in client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=MAX_TOKENS,
                    temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True}):
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                    chunks += 1
                    if on_progress and chunks == 3:
                        progress.wait()
            results[i] = ("".join(parts), usage)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
            progress.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    if on_progress:
        try:
            progress.wait()
        except threading.BrokenBarrierError:
            pass
        else:
            on_progress()
    for t in threads:
        t.join(180)
    assert not errors, errors
    return results


def test_serve_across_nodes_and_survive_a_decode_node_loss(tmp_path):
    lc = launcher_module()
    with cluster_dir() as d:
        http_port, grpc_port = free_port(), free_port()
        log = tmp_path / "launcher.log"
        with log.open("w") as out:
            launcher = subprocess.Popen(
                [sys.executable, str(LAUNCHER), "start", "--prefill", "1", "--decode", "2", "--dir", str(d),
                 "--health-check-ms", "300", "--serve", "--", *SERVE_ARGS, "--http-port", str(http_port),
                 "--grpc-port", str(grpc_port)], stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{http_port}"
        try:
            wait_healthy(url, launcher, log, timeout=360)

            # each worker on its role's node: the prefill worker on prefill-0, one decode worker per decode node
            workers = httpx.get(url + "/admin/workers", timeout=10).json()["workers"]
            nodes = node_of_pid(d)
            placed = sorted((w["role"], nodes.get(w["pid"])) for w in workers)
            assert placed == [("decode", "decode-0"), ("decode", "decode-1"), ("prefill", "prefill-0")], workers
            assert len({w["node_id"] for w in workers}) == 3

            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=180)
            reference = stream_all(client)
            assert all(text and usage == MAX_TOKENS for text, usage in reference), reference
            # prefilled on the prefill node, its KV streamed to the decode nodes
            assert metric(url, "splitserve_placement_decisions", reason="prefill_remote") >= len(PROMPTS)

            victim = next(w for w in workers if w["role"] == "decode" and nodes[w["pid"]] == "decode-1")
            recoveries = metric(url, "splitserve_recoveries")
            killed: list = []

            def kill_decode_node() -> None:
                killed.append(launch("stop", "--node", "decode-1", "--dir", str(d)))

            assert stream_all(client, on_progress=kill_decode_node) == reference   # no lost or repeated token
            assert killed[0].returncode == 0, killed[0].stderr
            assert not lc.node_processes(d, "decode-1")
            assert metric(url, "splitserve_recoveries") > recoveries, "no request was in flight on the node"
            after = {w["worker_id"]: w for w in httpx.get(url + "/admin/workers", timeout=10).json()["workers"]}
            assert not after[victim["worker_id"]]["alive"]

            # and it keeps serving on what is left
            assert stream_all(client) == reference

            started = time.monotonic()
            code = interrupt(launcher, timeout=120)     # Ctrl-C: the server drains and exits, then the cluster
            assert code == 0, f"exit status {code} after {time.monotonic() - started:.0f}s:\n{log.read_text()[-4000:]}"
            assert "draining" in log.read_text()
            assert not lc.node_processes(d)
            assert not processes_mentioning(str(d))
            assert json.loads((d / "cluster.json").read_text())["nodes"]   # the state stays for `status`
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait(10)
