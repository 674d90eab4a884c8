"""The step scheduler driven with fabricated model outputs: budgets, chunking, preemption, stops, abort."""

from __future__ import annotations

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler, SchedulerConfig
from splitserve.engine.sequence import Sequence

EOS = 2


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=256,
                                     eos_token_ids=(EOS,)), bm), bm


def step(sched, token=5):
    batch = sched.schedule()
    sampled = [token if batch.samples(i) else None for i in range(len(batch))]
    return batch, sched.postprocess(batch, sampled)


def test_long_prompt_is_chunked_and_decodes_go_first():
    sched, bm = make(budget=8)
    short = Sequence("short", [1, 3], SamplingParams(max_tokens=50))
    sched.add(short)
    step(sched)                                  # short prefilled, now decoding
    long = Sequence("long", list(range(10, 30)), SamplingParams(max_tokens=5))
    sched.add(long)
    batch, _ = step(sched)
    assert batch.seqs[0] is short and batch.num_new_tokens == [1, 7]    # decode first, then a 7-token chunk
    batch, _ = step(sched)
    assert batch.num_new_tokens == [1, 7]
    batch, _ = step(sched)
    assert batch.num_new_tokens == [1, 6] and long.num_output_tokens == 1  # last chunk samples a token


def test_preemption_frees_and_requeues_then_everything_finishes():
    sched, bm = make(num_blocks=6, block_size=4, budget=64)
    seqs = [Sequence(f"s{i}", [1] * 6, SamplingParams(max_tokens=8, ignore_eos=True)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    finished = []
    for _ in range(200):
        if not sched.has_unfinished:
            break
        finished += step(sched)[1]
    assert sched.num_preemptions > 0
    assert sorted(s.request_id for s in finished) == ["s0", "s1", "s2"]
    assert all(s.num_output_tokens == 8 and s.finish_reason == "length" for s in finished)
    assert bm.num_free_blocks == 6


def test_eos_and_stop_token_ids():
    sched, _ = make()
    a = Sequence("a", [1, 3], SamplingParams(max_tokens=10))
    b = Sequence("b", [1, 3], SamplingParams(max_tokens=10, stop_token_ids=(9,), ignore_eos=True))
    c = Sequence("c", [1, 3], SamplingParams(max_tokens=10, ignore_eos=True))
    for s in (a, b, c):
        sched.add(s)
    _, done = step(sched, token=EOS)
    assert {s.request_id for s in done} == {"a"} and a.finish_reason == "stop"
    _, done = step(sched, token=9)
    assert {s.request_id for s in done} == {"b"}


def test_abort_frees_blocks():
    sched, bm = make()
    s = Sequence("x", list(range(12)), SamplingParams(max_tokens=10))
    sched.add(s)
    step(sched)
    assert bm.num_free_blocks < 64
    assert sched.abort("x") is s and s.finish_reason == "abort"
    assert bm.num_free_blocks == 64 and not sched.has_unfinished


def test_max_num_seqs_caps_the_batch():
    sched, _ = make(max_seqs=2, budget=100)
    for i in range(4):
        sched.add(Sequence(f"s{i}", [1, 2, 3], SamplingParams(max_tokens=3)))
    batch, _ = step(sched)
    assert len(batch) == 2 and len(sched.waiting) == 2


def test_an_urgent_sequence_goes_ahead_of_a_prompt_in_progress():
    sched, bm = make(budget=8)
    long = Sequence("long", list(range(10, 34)), SamplingParams(max_tokens=2))
    new = Sequence("new", [1, 3, 4], SamplingParams(max_tokens=2))
    sched.add(long)
    batch, _ = step(sched)
    assert batch.num_new_tokens == [8]                          # the long prompt's first chunk
    sched.add(new)
    first = Sequence("rec-1", list(range(40, 50)), SamplingParams(max_tokens=2))
    second = Sequence("rec-2", [7, 8], SamplingParams(max_tokens=2))
    sched.add_urgent(first)
    sched.add_urgent(second)                                    # behind the earlier urgent one, ahead of "new"
    assert [s.request_id for s in sched.waiting] == ["rec-1", "rec-2", "new"]
    batch, _ = step(sched)
    assert [s.request_id for s in batch.seqs] == ["rec-1"] and batch.num_new_tokens == [8]
    batch, _ = step(sched)                                      # rec-1 keeps its place ahead of "long"
    assert [s.request_id for s in batch.seqs] == ["rec-1", "rec-2", "long"]
    assert batch.num_new_tokens == [2, 2, 4] and first.num_output_tokens == 1 and second.num_output_tokens == 1
    for _ in range(20):
        if not sched.has_unfinished:
            break
        step(sched)
    assert not sched.has_unfinished and bm.num_free_blocks == 64
