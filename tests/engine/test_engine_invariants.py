"""The engine gives the same tokens however a request is batched, chunked, cached, preempted or restarted."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.sampling_params import SamplingParams

TEXTS = ["Explain why the sky is blue in two sentences.", "Name a fruit.",
         "Write a short poem about autumn leaves falling on a quiet street.", "What is 12 times 12?"]


@pytest.fixture(scope="module")
def prompts(engine_f32):
    return [engine_f32.encode_prompt(t, chat=True) for t in TEXTS]


@contextlib.contextmanager
def tuned(engine, num_blocks: int | None = None, **scheduler_fields):
    """Temporarily run `engine` with a smaller KV pool and/or other scheduler limits."""
    sched, old_cfg, old_bm = engine.scheduler, engine.scheduler.config, engine.block_manager
    sched.config = dataclasses.replace(old_cfg, **scheduler_fields)
    if num_blocks is not None:
        engine.block_manager = sched.blocks = BlockManager(num_blocks, old_bm.block_size, old_bm.salt)
    try:
        yield engine
    finally:
        sched.config = old_cfg
        if num_blocks is not None:
            # the tuned manager reused the same KV pages, so the old manager's prefix cache is stale: start clean
            fresh = BlockManager(old_bm.num_blocks, old_bm.block_size, old_bm.salt)
            engine.block_manager = sched.blocks = fresh


def test_batched_equals_one_at_a_time(engine_f32, prompts):
    params = SamplingParams(max_tokens=16)
    together = [o.token_ids for o in engine_f32.generate(prompts, params)]
    alone = [engine_f32.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone


def test_chunked_prefill_equals_whole_prefill(engine_f32, prompts):
    params = SamplingParams(max_tokens=12)
    whole = [o.token_ids for o in engine_f32.generate(prompts, params)]
    with tuned(engine_f32, max_num_batched_tokens=7) as eng:   # prompts are cut into 7-token chunks
        chunked = [o.token_ids for o in eng.generate(prompts, params)]
    assert chunked == whole


def test_prefix_cache_hit_equals_miss(engine_f32, prompts):
    params = SamplingParams(max_tokens=12)
    with tuned(engine_f32, num_blocks=256) as eng:           # a fresh, empty cache
        miss = eng.generate([prompts[2]], params)[0]
        hit = eng.generate([prompts[2]], params)[0]
    assert miss.num_cached_tokens == 0
    assert hit.num_cached_tokens >= len(prompts[2]) - 2 * eng.config.block_size
    assert hit.token_ids == miss.token_ids


def test_preempted_equals_uninterrupted(engine_f32, prompts):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    free = [o.token_ids for o in engine_f32.generate(prompts, params)]
    blocks_each = (max(map(len, prompts)) + 40) // 16 + 1
    with tuned(engine_f32, num_blocks=blocks_each * 2 + 1) as eng:    # room for ~2 of the 4 at full length
        tight = [o.token_ids for o in eng.generate(prompts, params)]
        assert eng.scheduler.num_preemptions > 0
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert tight == free


@pytest.mark.parametrize("sampling", [dict(temperature=0.8, top_p=0.9, seed=1234),
                                      dict(temperature=1.0, top_k=20, seed=7, repetition_penalty=1.2)])
def test_seeded_restart_from_committed_tokens(engine_f32, prompts, sampling):
    params = SamplingParams(max_tokens=24, ignore_eos=True, **sampling)
    full = engine_f32.generate([prompts[0]], params)[0].token_ids
    committed = full[:9]
    engine_f32.add_request("resumed", prompts[0], params, committed_token_ids=committed)
    rest: list[int] = []
    while engine_f32.has_unfinished:
        for out in engine_f32.step():
            rest += out.new_token_ids
    assert committed + rest == full
    # and a different seed gives a different continuation (the seed matters)
    other = engine_f32.generate([prompts[0]], dataclasses.replace(params, seed=params.seed + 1))[0].token_ids
    assert other != full


def test_abort_frees_blocks(engine_f32, prompts):
    bm = engine_f32.block_manager
    baseline = bm.num_free_blocks
    engine_f32.add_request("to-abort", prompts[1], SamplingParams(max_tokens=50))
    engine_f32.step()
    assert bm.num_free_blocks < baseline
    assert engine_f32.abort("to-abort")
    assert bm.num_free_blocks == baseline and not engine_f32.has_unfinished


def test_stop_string_and_max_tokens(engine_f32, prompts):
    base = engine_f32.generate([prompts[0]], SamplingParams(max_tokens=30))[0]
    word = base.text.split()[3]
    stopped = engine_f32.generate([prompts[0]], SamplingParams(max_tokens=30, stop=(word,)))[0]
    assert stopped.finish_reason == "stop" and word not in stopped.text
    assert base.text.startswith(stopped.text)
    capped = engine_f32.generate([prompts[0]], SamplingParams(max_tokens=5))[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) == 5
