"""`max_prefill_tokens_with_decodes`: a step that decodes carries at most that many prompt tokens."""

from __future__ import annotations

import pytest

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler, SchedulerConfig
from splitserve.engine.sequence import Sequence


def make(cap, budget=64):
    bm = BlockManager(64, 4)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=256,
                             max_prefill_tokens_with_decodes=cap)
    return Scheduler(config, bm), bm


def step(sched):
    batch = sched.schedule()
    sched.postprocess(batch, [5 if batch.samples(i) else None for i in range(len(batch))])
    return batch


_first_token = iter(range(100, 10**6, 100))


def seq(name, n, max_tokens=50):
    """A prompt of `n` tokens sharing no prefix with any other."""
    start = next(_first_token)
    return Sequence(name, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_prompts_are_capped_only_while_something_decodes():
    sched, _ = make(cap=8)
    first = seq("first", 30)
    sched.add(first)
    assert step(sched).num_new_tokens == [30]                 # nothing decodes yet: the whole step budget
    second, third = seq("second", 20), seq("third", 20)
    sched.add(second)
    sched.add(third)
    batch = step(sched)
    assert batch.seqs == [first, second] and batch.num_new_tokens == [1, 8]   # the cap, shared by new prompts
    batch = step(sched)
    assert batch.seqs == [first, second] and batch.num_new_tokens == [1, 8]
    batch = step(sched)
    assert batch.seqs == [first, second, third] and batch.num_new_tokens == [1, 4, 4]
    assert second.num_output_tokens == 1                      # its last chunk sampled its first token


def test_urgent_recoveries_are_not_capped():
    sched, _ = make(cap=4)
    sched.add(seq("decoding", 6))
    step(sched)
    recovery = seq("recovery", 24)
    sched.add_urgent(recovery)
    batch = step(sched)
    assert batch.seqs[0] is recovery and batch.num_new_tokens == [24, 1]


def test_no_cap_by_default_and_everything_finishes_under_one():
    for cap in (0, 3):
        sched, bm = make(cap=cap, budget=32)
        seqs = [seq(f"s{i}", 9 + 5 * i, max_tokens=6) for i in range(4)]
        for s in seqs:
            sched.add(s)
        mixed = []          # prompt tokens of each step that also decoded
        while sched.has_unfinished:
            batch = sched.schedule()
            decodes = [n for n in batch.num_new_tokens if n == 1]
            if decodes:
                mixed.append(batch.num_tokens - len(decodes))
            sched.postprocess(batch, [5 if batch.samples(i) else None for i in range(len(batch))])
        assert all(s.num_output_tokens == 6 for s in seqs) and bm.num_free_blocks == 64
        assert (max(mixed) > 3) == (cap == 0)


def test_negative_cap_is_refused():
    with pytest.raises(ValueError, match="max_prefill_tokens_with_decodes"):
        SchedulerConfig(max_prefill_tokens_with_decodes=-1)


def test_serve_flag_reaches_the_engine_config_and_bad_values_are_refused():
    from splitserve.cli import build_parser
    from splitserve.cmd_serve import engine_config_from

    args = build_parser().parse_args(["serve", "--colocated", "--max-prefill-tokens-with-decodes", "128"])
    assert engine_config_from(args).max_prefill_tokens_with_decodes == 128
    assert engine_config_from(build_parser().parse_args(["serve"])).max_prefill_tokens_with_decodes == 0
    bad = build_parser().parse_args(["serve", "--max-prefill-tokens-with-decodes", "-5"])
    with pytest.raises(ValueError, match="max_prefill_tokens_with_decodes must be an integer >= 0"):
        engine_config_from(bad)
