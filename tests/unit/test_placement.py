"""Placement: the decode worker by load, the prefill worker by queued work, and when the decode worker prefills
itself (short or cached prompts, and, with conditional disaggregation, a backlogged prefill pool)."""

from __future__ import annotations

from splitserve.engine.block_hash import chain_hashes
from splitserve.router.placement import Candidate, place

BS, SALT = 16, 7
PROMPT = list(range(1000, 1512))           # 512 tokens, 32 blocks


def choose(decode, prefill, backlog_s=None, prompt=PROMPT, threshold=32):
    return place(prompt, decode, prefill, BS, SALT, threshold, backlog_s=backlog_s)


def test_least_busy_decode_worker_and_least_queued_prefill_worker():
    decode = [Candidate("d1", active_requests=3), Candidate("d2", active_requests=1)]
    prefill = [Candidate("p1", inflight_tokens=900), Candidate("p2", inflight_tokens=100)]
    c = choose(decode, prefill)
    assert (c.decode, c.prefill, c.reason) == ("d2", "p2", "prefill_remote")


def test_short_and_cached_prompts_stay_on_the_decode_worker():
    c = choose([Candidate("d")], [Candidate("p")], prompt=PROMPT[:20])
    assert (c.prefill, c.reason) == (None, "decode_local_short")
    cached = frozenset(chain_hashes(PROMPT, BS, SALT)[:31])          # all but the last 16 tokens cached there
    c = choose([Candidate("d", prefix_hashes=cached)], [Candidate("p")])
    assert (c.prefill, c.reason, c.cached_tokens) == (None, "decode_local_cached", 496)


def test_prefix_overlap_counts_against_a_prefill_workers_queue():
    hashes = frozenset(chain_hashes(PROMPT, BS, SALT))
    prefill = [Candidate("p1", inflight_tokens=300, prefix_hashes=hashes), Candidate("p2", inflight_tokens=100)]
    c = choose([Candidate("d")], prefill)
    assert (c.prefill, c.cached_tokens) == ("p1", 512)     # 300 queued + 0 uncached beats 100 + 512


def test_backlog_off_by_default_even_when_the_prefill_pool_is_deep():
    c = choose([Candidate("d")], [Candidate("p", inflight_tokens=5000, prefill_rate=500.0)])
    assert c.reason == "prefill_remote"


def test_backlogged_prefill_pool_borrows_an_idle_decode_worker():
    prefill = [Candidate("p", inflight_tokens=1000, prefill_rate=500.0)]       # 2 s queued ahead
    c = choose([Candidate("d")], prefill, backlog_s=1.0)
    assert (c.decode, c.prefill, c.reason) == ("d", None, "decode_local_backlog")
    # under the backlog: remote
    assert choose([Candidate("d")], prefill, backlog_s=2.5).reason == "prefill_remote"


def test_backlog_offload_is_one_prompt_at_a_time_per_decode_worker():
    prefill = [Candidate("p", inflight_tokens=1000, prefill_rate=500.0)]
    busy = Candidate("d", inflight_tokens=400)                 # already prefilling a prompt of its own
    assert choose([busy], prefill, backlog_s=1.0).reason == "prefill_remote"


def test_backlog_needs_a_measured_prefill_rate():
    prefill = [Candidate("p", inflight_tokens=100_000, prefill_rate=None)]
    assert choose([Candidate("d")], prefill, backlog_s=0.0).reason == "prefill_remote"


def test_backlog_offload_only_when_local_is_sooner():
    # the prefill worker holds the whole prompt in its prefix cache: 200 queued tokens beat 512 uncached locally
    hashes = frozenset(chain_hashes(PROMPT, BS, SALT))
    prefill = [Candidate("p", inflight_tokens=200, prefill_rate=100.0, prefix_hashes=hashes)]
    c = choose([Candidate("d")], prefill, backlog_s=1.0)
    assert (c.prefill, c.reason) == ("p", "prefill_remote")


def test_backlog_offload_weighs_the_decode_workers_own_prefill_rate():
    """A decode worker computes a prompt beside its decodes (in short chunks under a prompt cap), far slower than
    a prefill worker: it takes the prompt only if it would still be done sooner at its own measured rate."""
    prefill = [Candidate("p", inflight_tokens=1000, prefill_rate=500.0)]        # 2 s queued + 1 s for this one
    slow = Candidate("d", prefill_rate=100.0)                                   # 512 tokens: 5.1 s here
    assert choose([slow], prefill, backlog_s=1.0).reason == "prefill_remote"
    fast_enough = Candidate("d", prefill_rate=200.0)                            # 2.6 s here
    assert choose([fast_enough], prefill, backlog_s=1.0).reason == "decode_local_backlog"


def test_colocated_ignores_prefill_workers():
    c = place(PROMPT, [Candidate("w")], [], BS, SALT, 32, colocated=True, backlog_s=0.0)
    assert (c.decode, c.prefill, c.reason) == ("w", None, "colocated")
