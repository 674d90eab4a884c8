"""With Redis, a router that crashes mid-stream is replaced by a new one that resumes every unfinished request
from the journal; clients reconnect with Resume and get the full, fault-free output with no gap or repeat.
Redis down at start is a clear error, not a hang."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from splitserve.client import Client
from splitserve.engine.sampling_params import SamplingParams

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cluster"))
sys.path.insert(0, str(HERE.parent / "journal"))
from redis_server import RedisServer, free_port  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

PROMPTS = ["Tell me a long story about a dragon who collects clocks.",
           "Explain how rain forms, in many small steps."]
N_TOKENS = 40
ARGS = ("--prefill-workers", "1", "--decode-workers", "1", "--dtype", "float32", "--kv-cache-gb", "0.25",
        "--cpus-per-worker", "0.5")


def sampling(i):
    return dict(temperature=0.0) if i == 0 else dict(temperature=0.7, seed=5)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


def test_router_crash_and_restart_resumes_streams(redis_url, engine_f32):
    prompts = [engine_f32.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    expected = [c.token_ids for c in engine_f32.generate(
        prompts, [SamplingParams(max_tokens=N_TOKENS, ignore_eos=True, **sampling(i)) for i in range(2)])]
    ports = (free_port(), free_port())
    first = ServeProcess(*ARGS, "--redis-url", redis_url, ports=ports)
    results: list = [None, None]
    progress = threading.Barrier(3)

    def one(i):
        with Client(f"127.0.0.1:{ports[1]}", timeout=600, reconnect_timeout=300, max_retries=50) as client:
            chunks = []
            with client.stream(messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=N_TOKENS,
                               ignore_eos=True, **sampling(i)) as stream:
                for chunk in stream:
                    chunks.append(chunk)
                    if len(chunks) == 5:
                        progress.wait(300)
            results[i] = chunks

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    progress.wait(300)
    first.kill()                                       # the router dies mid-stream
    second = ServeProcess(*ARGS, "--redis-url", redis_url, ports=ports)
    try:
        for t in threads:
            t.join(600)
        for chunks, want in zip(results, expected):
            assert chunks is not None
            assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))
            assert [t for c in chunks for t in c.token_ids] == want
        assert "recovered 2 unfinished requests" in second.output()
    finally:
        assert second.stop() == 0


def test_redis_down_at_start_is_a_clear_error():
    closed = free_port()
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "serve", "--redis-url",
                          f"redis://127.0.0.1:{closed}/0", "--http-port", str(free_port()), "--grpc-port",
                          str(free_port())], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"redis://127.0.0.1:{closed}/0" in out.stderr and "Redis" in out.stderr
    assert time.monotonic() - started < 60
