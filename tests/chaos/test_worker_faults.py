"""Requests survive a SIGKILLed decode worker, a SIGKILLed prefill worker and a drain, with exactly the tokens
they would have produced, no gap and no repeat in any stream, and KV blocks back to baseline afterwards."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from splitserve.client import Client
from splitserve.engine.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from serve_process import ServeProcess, stream_through_fault, workers  # noqa: E402

PROMPTS = ["Write a long story about a lighthouse keeper and a storm.",
           "Explain, step by step, how a bicycle gear system works and why it helps.",
           "Describe a walk through a busy market in a city you imagine.",
           "List ten facts about the ocean, one per line, with a short explanation each."]
N_TOKENS = 48


def sampling(i: int) -> dict:
    return dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.8, top_p=0.95, seed=40 + i)


@pytest.fixture(scope="module")
def server():
    proc = ServeProcess("--prefill-workers", "2", "--decode-workers", "2", "--dtype", "float32",
                        "--kv-cache-gb", "0.25", "--cpus-per-worker", "0.5", "--local-prefill-threshold", "16")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def expected(engine_f32):
    prompts = [engine_f32.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    params = [SamplingParams(max_tokens=N_TOKENS, ignore_eos=True, **sampling(i)) for i in range(len(PROMPTS))]
    return [c.token_ids for c in engine_f32.generate(prompts, params)]


def run_streams(server, fault) -> list[list]:
    """Stream every prompt concurrently; call `fault()` once each stream has a few chunks."""
    return stream_through_fault(server, PROMPTS, N_TOKENS, sampling, fault, after_chunks=4)


def check(results, expected) -> None:
    for chunks, want in zip(results, expected):
        assert chunks is not None
        assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))       # no gap, no repeat
        assert [t for c in chunks for t in c.token_ids] == want                  # the fault-free tokens


def blocks_back_to_baseline(server) -> None:
    with Client(f"127.0.0.1:{server.grpc_port}", timeout=30) as client:
        for _ in range(60):
            live = [w for w in client.load().workers if w.state == "ready"]
            if live and all(w.num_free_blocks == w.num_total_blocks for w in live):
                return
            time.sleep(0.5)
    pytest.fail(f"KV blocks not back to baseline: {client.load()}")


def test_drain_migrates_live_kv(server, expected):
    report = {}

    def fault():
        target = next(w for w in workers(server) if w["role"] == "decode" and w["alive"])["worker_id"]
        r = httpx.post(server.url + "/admin/drain", json={"target": target, "deadline_s": 30}, timeout=60)
        report.update(r.json())

    check(run_streams(server, fault), expected)
    assert report["migrated"] >= 1 and report["recomputed"] == 0, report
    # the drained worker leaves the pool and a fresh one joins, while serving
    gone = report["workers"][0]
    assert httpx.delete(f"{server.url}/admin/workers/{gone}", timeout=60).status_code == 200
    added = httpx.post(server.url + "/admin/workers", json={"role": "decode"}, timeout=300).json()
    ids = {w["worker_id"] for w in workers(server)}
    assert gone not in ids and added["worker_id"] in ids
    blocks_back_to_baseline(server)


def test_sigkill_decode_worker(server, expected):
    def fault():
        victim = next(w for w in workers(server) if w["role"] == "decode" and w["alive"] and not w["draining"])
        os.kill(victim["pid"], signal.SIGKILL)

    check(run_streams(server, fault), expected)
    blocks_back_to_baseline(server)


def test_sigkill_prefill_worker(server, expected):
    def fault():
        victim = next(w for w in workers(server) if w["role"] == "prefill" and w["alive"])
        os.kill(victim["pid"], signal.SIGKILL)

    check(run_streams(server, fault), expected)
    assert any(w["role"] == "prefill" and not w["alive"] for w in workers(server))     # listed as dead
    for _ in range(120):                                    # and a successor keeps the pool at its size
        if sum(w["role"] == "prefill" and w["alive"] for w in workers(server)) == 2:
            break
        time.sleep(1)
    else:
        pytest.fail(f"no replacement prefill worker: {workers(server)}")


def test_hung_decode_worker_is_lost_by_heartbeat(server, expected):
    """SIGSTOP: the process exists, so Ray reports nothing; the missed heartbeat (load, then ping, both time
    out) is what declares the worker lost, and its requests finish elsewhere with the same tokens."""
    stopped = []

    def fault():
        victim = next(w for w in workers(server) if w["role"] == "decode" and w["alive"] and not w["draining"])
        os.kill(victim["pid"], signal.SIGSTOP)
        stopped.append(victim)

    try:
        check(run_streams(server, fault), expected)
        victim = stopped[0]
        assert any(w["worker_id"] == victim["worker_id"] and not w["alive"] for w in workers(server))
        assert "missed its heartbeat" in server.output()
    finally:
        for w in stopped:
            try:
                os.kill(w["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    blocks_back_to_baseline(server)
