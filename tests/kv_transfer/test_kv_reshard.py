"""Resharding plans: which sender TP rank sends which KV heads to which receiver TP rank."""

from __future__ import annotations

import itertools

import pytest

from splitserve.engine.kv_layout import kv_head_range
from splitserve.kv_transfer import HeadPull, plan_pulls


def test_four_heads_split_two_two():
    assert plan_pulls(4, 2, 1) == [HeadPull(0, 0, 0, 2), HeadPull(1, 0, 2, 4)]
    assert plan_pulls(4, 1, 2) == [HeadPull(0, 0, 0, 2), HeadPull(0, 1, 2, 4)]


def test_replicated_head_is_pulled_once_and_replicas_share_the_load():
    assert plan_pulls(1, 2, 1) == [HeadPull(0, 0, 0, 1)]                        # rank 1 sends nothing
    assert plan_pulls(1, 1, 2) == [HeadPull(0, 0, 0, 1), HeadPull(0, 1, 0, 1)]  # both ranks get head 0
    assert plan_pulls(1, 2, 2) == [HeadPull(0, 0, 0, 1), HeadPull(1, 1, 0, 1)]  # each replica serves one


def test_local_head_slices():
    pull = HeadPull(src_rank=1, dst_rank=0, head_start=2, head_end=4)
    assert pull.src_slice(4, 2) == slice(0, 2)          # sender rank 1 holds heads 2-3 locally as 0-1
    assert pull.dst_slice(4, 1) == slice(2, 4)


@pytest.mark.parametrize("heads,src_tp,dst_tp", [
    (h, s, d) for h, s, d in itertools.product([1, 2, 3, 4, 8], [1, 2, 3, 4, 6, 8], [1, 2, 3, 4, 6, 8])
    if (h % s == 0 if h >= s else s % h == 0) and (h % d == 0 if h >= d else d % h == 0)])
def test_every_receiver_head_comes_from_exactly_one_holder(heads, src_tp, dst_tp):
    pulls = plan_pulls(heads, src_tp, dst_tp)
    for r in range(dst_tp):
        got = sorted(h for p in pulls if p.dst_rank == r for h in range(p.head_start, p.head_end))
        assert got == list(kv_head_range(heads, dst_tp, r))
    for p in pulls:
        assert p.num_heads > 0
        src = kv_head_range(heads, src_tp, p.src_rank)
        assert src.start <= p.head_start and p.head_end <= src.stop


@pytest.mark.parametrize("src_tp, dst_tp", [(2, 1), (1, 2)])
def test_smollm2_three_kv_heads_split_unevenly_across_two_ranks(src_tp, dst_tp):
    # SmolLM2 has 3 KV heads: at TP=2 rank 0 holds heads {0, 1} and rank 1 holds {2}
    assert [list(kv_head_range(3, 2, r)) for r in range(2)] == [[0, 1], [2]]
    pulls = plan_pulls(3, src_tp, dst_tp)
    for r in range(dst_tp):
        got = sorted(h for p in pulls if p.dst_rank == r for h in range(p.head_start, p.head_end))
        assert got == list(kv_head_range(3, dst_tp, r))
