"""`splitserve serve --tp 2` on CPU/Gloo: one Ray actor per rank, greedy tokens equal the TP=1 engine's (what
`splitserve generate` runs), and a SIGKILLed follower rank makes its whole worker dead: requests re-placed and
complete with the same tokens, the worker (all its ranks) replaced. Mixed degrees (`--prefill-tp 2 --decode-tp 1`
and the reverse) are covered in-process by test_tp_kv.py."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sys
import time
from pathlib import Path

import openai
import pytest

from splitserve.engine.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from serve_process import ServeProcess, stream_through_fault, workers  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct.Q4_1"
# short prompts are prefilled by the decode worker itself, long ones stream their KV shards rank to rank
PROMPTS = ["Hi", "Name a color.",
           "Explain in simple words how photosynthesis turns sunlight, water and carbon dioxide into sugar.",
           "Write a short story about a robot who learns to paint, set in a small coastal town in winter."]
MAX_TOKENS = [6, 10, 12, 8]
STREAM_TOKENS = 16


@pytest.fixture(scope="module")
def server():
    proc = ServeProcess("--tp", "2", "--dtype", "float32", "--kv-cache-gb", "0.25", "--cpus-per-worker", "0.5",
                        "--local-prefill-threshold", "40", timeout=300)
    yield proc
    proc.stop()


def chat_ids(engine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


@pytest.mark.timeout(600)      # includes starting the server (4 ranks loading) on a busy CI machine
def test_serve_tp2_same_greedy_tokens_as_tp1(server, engine_f32):
    assert {(w["role"], w["tp"], len(w["rank_pids"])) for w in workers(server)} == {("prefill", 2, 2),
                                                                                    ("decode", 2, 2)}
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in MAX_TOKENS]
    expected = [c.text for c in engine_f32.generate([chat_ids(engine_f32, p) for p in PROMPTS], params)]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=240)

    def call(i: int) -> str:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[i]}],
                                           max_tokens=MAX_TOKENS[i], temperature=0.0)
        return r.choices[0].message.content

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(call, range(len(PROMPTS)))) == expected


@pytest.mark.timeout(600)
def test_dead_follower_rank_is_a_dead_worker(server, engine_f32):
    prompts = PROMPTS[2:]
    params = SamplingParams(max_tokens=STREAM_TOKENS, temperature=0.0, ignore_eos=True)
    expected = [c.token_ids for c in engine_f32.generate([chat_ids(engine_f32, p) for p in prompts], params)]
    victims = {role: next(w for w in workers(server) if w["role"] == role and w["alive"])
               for role in ("decode", "prefill")}

    def fault() -> None:
        for victim in victims.values():                      # rank 1 only: rank 0 is alive and well
            os.kill(victim["rank_pids"][1], signal.SIGKILL)  # (the prefill worker sits idle: its heartbeat tells)

    results = stream_through_fault(server, prompts, STREAM_TOKENS, lambda i: dict(temperature=0.0), fault,
                                   after_chunks=3, wait_s=200)
    for chunks, want in zip(results, expected):
        assert chunks is not None
        assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))       # no gap, no repeat
        assert [t for c in chunks for t in c.token_ids] == want                  # the fault-free tokens
    for role, victim in victims.items():
        assert not {w["worker_id"]: w for w in workers(server)}[victim["worker_id"]]["alive"]
        for _ in range(120):                                 # a whole new TP=2 worker takes its place
            live = [w for w in workers(server) if w["role"] == role and w["alive"]]
            if live and live[0]["tp"] == 2 and len(live[0]["rank_pids"]) == 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"no replacement {role} worker: {workers(server)}")
        for _ in range(30):                                  # rank 0 went with the worker's placement group
            if not _alive(victim["rank_pids"][0]):
                break
            time.sleep(1)
        else:
            pytest.fail(f"rank 0 of the dead {role} worker (pid {victim['rank_pids'][0]}) is still running")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
