"""With `--redis-url`, Redis dies and comes back (SIGKILL for 1 s, then SIGTERM for 3 s; same data dir, AOF
persistence) while a serving cluster streams concurrent requests. Every request the server acknowledged (it sent at
least one chunk) finishes with the fault-free tokens, chunk seqs 1..n with no gap or repeat, and the restarted
Redis holds its journal record with exactly those tokens, finished. A request submitted while Redis is down waits
for it up to the router's create timeout (2 s); refused after that, it is not acknowledged and the SDK sends it
again, so it too is served once Redis is back (or, if Redis stayed away, ends UNAVAILABLE naming Redis)."""

from __future__ import annotations

import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from splitserve.client import Client, SplitServeError
from splitserve.engine.sampling_params import SamplingParams

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cluster"))
sys.path.insert(0, str(HERE.parent / "journal"))
from redis_server import RedisServer  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

ARGS = ("--prefill-workers", "1", "--decode-workers", "1", "--dtype", "float32", "--kv-cache-gb", "0.25",
        "--cpus-per-worker", "0.5")
CLIENTS = 3
PROMPT_TOKENS = 40          # over the local-prefill threshold: the prompt goes through the prefill worker
MAX_TOKENS = 16


@dataclass
class Outcome:
    index: int
    request_id: str = ""
    seqs: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: SplitServeError | None = None

    @property
    def acknowledged(self) -> bool:
        return bool(self.seqs) or self.finish_reason is not None


def spec(i: int, vocab_size: int) -> tuple[list[int], dict]:
    rng = random.Random(i)
    prompt = [rng.randrange(200, vocab_size - 200) for _ in range(PROMPT_TOKENS)]
    sampling = dict(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0)
    if i % 2:
        sampling.update(temperature=0.8, top_p=0.95, seed=1000 + i)
    return prompt, sampling


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_redis_restarted_under_load_loses_no_acknowledged_request(tmp_path, engine_f32):
    from splitserve.router.journal_redis import RedisJournal

    redis_server = RedisServer(tmp_path)
    redis_server.start()
    server = None
    try:
        server = ServeProcess(*ARGS, "--redis-url", redis_server.url)
        grpc_target = f"127.0.0.1:{server.grpc_port}"
        vocab = engine_f32.model_config.vocab_size
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        next_index = iter(range(10_000))
        stop = threading.Event()
        streaming = threading.Semaphore(0)        # released on each request's first chunk

        def load() -> None:
            with Client(grpc_target, timeout=120, reconnect_timeout=30, max_retries=20) as client:
                while not stop.is_set():
                    with lock:
                        out = Outcome(next(next_index))
                        outcomes.append(out)
                    prompt, sampling = spec(out.index, vocab)
                    try:
                        with client.stream(prompt, **sampling) as chunks:
                            out.request_id = chunks.request_id
                            for chunk in chunks:
                                if not out.seqs:
                                    streaming.release()
                                out.seqs.append(chunk.seq)
                                out.token_ids += chunk.token_ids
                            out.finish_reason = chunks.finish_reason
                    except SplitServeError as e:
                        out.error = e
                        time.sleep(0.2)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        outage: dict[str, float] = {}
        # SIGKILL (no final fsync) for less than the create timeout, then SIGTERM for longer: creates are refused
        for how, down_s in (("kill", 1.0), ("stop", 3.0)):
            for _ in range(CLIENTS):              # every client mid-stream
                assert streaming.acquire(timeout=120), "no request started streaming"
            t0 = time.monotonic()
            getattr(redis_server, how)()
            time.sleep(down_s)                    # decode steps go on; appends queue in the router
            redis_server.start()
            outage[how] = time.monotonic() - t0
        for _ in range(CLIENTS):                  # the cluster keeps serving after Redis is back
            assert streaming.acquire(timeout=120), "no request streamed after Redis came back"
        stop.set()
        for t in threads:
            t.join(180)
            assert not t.is_alive(), "a client stream hung"

        acked = [o for o in outcomes if o.acknowledged]
        refused = [o for o in outcomes if not o.acknowledged]
        assert len(acked) >= 3 * CLIENTS, (len(acked), outage)
        assert "unreachable" in server.output() and "back after" in server.output()   # the writer held on
        for o in refused:                         # never recorded: a clear, retryable refusal
            assert o.error is not None and o.error.code == "UNAVAILABLE" and "Redis" in str(o.error), o
        failed = [(o.index, o.request_id, o.error) for o in acked if o.error is not None or o.finish_reason != "length"]
        assert not failed, f"acknowledged requests that did not finish: {failed}"
        for o in acked:
            assert o.seqs == list(range(1, len(o.seqs) + 1)), f"{o.request_id}: chunk seqs {o.seqs}"
        prompts, params = zip(*(spec(o.index, vocab) for o in acked))
        want = [c.token_ids for c in engine_f32.generate(list(prompts), [SamplingParams(**p) for p in params])]
        wrong = [o.request_id for o, w in zip(acked, want) if o.token_ids != w]
        assert not wrong, f"{len(wrong)}/{len(acked)} acknowledged requests differ from the fault-free output"

        journal = RedisJournal.connect(redis_server.url, ttl_s=300)
        try:
            deadline = time.monotonic() + 30      # the router's writer drains what it queued during the outages
            while True:
                records = {o.request_id: journal.get(o.request_id) for o in acked}
                pending = [rid for rid, rec in records.items() if rec is None or not rec.finished]
                if not pending or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            lost = [o.request_id for o in acked if records[o.request_id] is None]
            assert not lost, f"acknowledged requests missing from Redis after its restarts: {lost}"
            assert not pending, f"journal records never finished: {pending}"
            mismatched = [o.request_id for o in acked if records[o.request_id].token_ids != o.token_ids]
            assert not mismatched, f"journal tokens lost or duplicated for {mismatched}"
        finally:
            journal.close()
    finally:
        if server is not None:
            assert server.stop() == 0, server.output()[-3000:]
        redis_server.stop()
