"""A drain spreads the requests it moves over the decode workers left, by load, not all onto the least busy one."""

from __future__ import annotations

from splitserve.router.migration import spread
from splitserve.router.placement import Candidate


def test_requests_drained_together_are_spread_by_load():
    targets = [Candidate("d1", active_requests=2, free_blocks=100), Candidate("d2", active_requests=0, free_blocks=50),
               Candidate("d3", active_requests=1, free_blocks=80)]
    # d2 first (idle); then d2 and d3 tie at 1 and d3 has more free blocks; then d2; then all tie at 2: d1, d3
    assert spread(5, targets) == ["d2", "d3", "d2", "d1", "d3"]


def test_ties_go_to_the_worker_with_more_free_blocks():
    targets = [Candidate("a", free_blocks=10), Candidate("b", free_blocks=30)]
    assert spread(2, targets) == ["b", "a"]


def test_no_destination_means_recompute_for_every_request():
    assert spread(3, []) == [None, None, None]
    assert spread(0, [Candidate("a")]) == []
