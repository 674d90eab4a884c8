"""TPEngine on SmolLM2 (float32, CPU, Gloo): TP=2 gives TP=1's greedy tokens, through the engine and the CLI;
a follower rank that dies is a clear error at rank 0, and close() stops the followers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from tp_helpers import PROMPTS, f32_config, teacher_forced_logits
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tp_engine import TPEngine, TPRankError

GREEDY = SamplingParams(max_tokens=12)


@pytest.fixture(scope="module")
def tp2():
    engine = TPEngine(f32_config(tp=2), timeout_s=30.0)
    yield engine
    engine.close()


def test_tp2_same_greedy_tokens_as_tp1(tp2, engine_f32, prompt_ids):
    expected = [c.token_ids for c in engine_f32.generate(prompt_ids, GREEDY)]
    assert [c.token_ids for c in tp2.generate(prompt_ids, GREEDY)] == expected


def test_tp2_has_the_engine_surface(tp2, engine_f32):
    assert tp2.runner.dtype == torch.float32
    assert tp2.max_model_len == engine_f32.max_model_len
    assert tp2.model_config == engine_f32.model_config
    assert tp2.encode_prompt(PROMPTS[0]) == engine_f32.encode_prompt(PROMPTS[0])
    assert tp2.runner.layout.num_kv_heads == 2 and tp2.runner.layout.tp_size == 2   # KV heads {0, 1} of 3
    assert tp2.scheduler.has_unfinished is False


def test_tp2_teacher_forced_logits_match_tp1(tp2, engine_f32, prompt_ids):
    ids = prompt_ids[3]
    torch.testing.assert_close(teacher_forced_logits(tp2, ids), teacher_forced_logits(engine_f32, ids),
                               rtol=1e-4, atol=1e-3)


def test_cli_generate_tp2(engine_f32):
    prompt = PROMPTS[1]
    cmd = [sys.executable, "-m", "splitserve.cli", "generate", prompt, "--tp", "2", "--dtype", "float32",
           "--max-tokens", "10", "--kv-cache-gb", "0.02", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    [expected] = engine_f32.generate([engine_f32.encode_prompt(prompt)], SamplingParams(max_tokens=10))
    assert out["token_ids"] == expected.token_ids and out["dtype"] == "float32"


def test_dead_follower_is_a_clear_error_not_a_hang(tp2, prompt_ids):
    """Runs last in this module: it breaks the shared engine."""
    follower = tp2.followers.procs[0]
    follower.kill()
    follower.wait()
    started = time.monotonic()
    with pytest.raises(TPRankError, match="rank 1 exited with code -9"):
        tp2.generate(prompt_ids[:1], GREEDY)
    assert time.monotonic() - started < 10
    with pytest.raises(TPRankError):          # the engine stays failed
        tp2.generate(prompt_ids[:1], GREEDY)
    assert not tp2.has_unfinished             # the request was aborted, its blocks freed
    assert tp2.block_manager.num_free_blocks == tp2.block_manager.num_blocks
