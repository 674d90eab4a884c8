"""Block manager bookkeeping without a model: allocation, reference counts, prefix cache, eviction."""

from __future__ import annotations

import pytest

from splitserve.engine.block_hash import chain_hashes
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams())


def compute_all(bm, s):
    assert bm.allocate(s, s.num_uncomputed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


def test_allocate_and_free_return_to_baseline():
    bm = BlockManager(8, 4)
    s = seq(range(10))
    assert bm.allocate(s, 10) and len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_allocation_refused_without_side_effects():
    bm = BlockManager(2, 4)
    s = seq(range(20))
    assert not bm.allocate(s, 20)
    assert bm.num_free_blocks == 2 and s.block_table == []


def test_prefix_is_shared_not_copied():
    bm = BlockManager(16, 4)
    a = seq(range(13), "a")
    compute_all(bm, a)
    b = seq(list(range(12)) + [99, 98], "b")
    hit = bm.match_prefix(b)
    assert hit == 12 and b.block_table == a.block_table[:3]
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:3])
    bm.free(a)
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table)


def test_full_prompt_hit_leaves_a_token_to_compute():
    bm = BlockManager(16, 4)
    a = seq(range(8), "a")
    compute_all(bm, a)
    b = seq(range(8), "b")
    assert bm.match_prefix(b) == 4           # the last block is recomputed so the step has logits to sample
    assert b.num_uncomputed_tokens == 4


def test_freed_cached_blocks_revive_until_reused():
    bm = BlockManager(4, 4)
    a = seq(range(8), "a")
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq(list(range(8)) + [5], "b")
    assert bm.match_prefix(b) == 8 and bm.num_free_blocks == 2
    bm.free(b)
    c = seq(range(100, 116), "c")            # needs every block: evicts the cached ones
    compute_all(bm, c)
    bm.free(c)
    d = seq(list(range(8)) + [5], "d")
    assert bm.match_prefix(d) == 0


def test_hash_collision_is_confirmed_by_tokens(monkeypatch):
    import splitserve.engine.block_manager as mod

    monkeypatch.setattr(mod, "block_hash", lambda prev, tokens: 42)   # every block collides
    bm = BlockManager(8, 4)
    a = seq(range(4), "a")
    compute_all(bm, a)
    b = seq([7, 7, 7, 7, 1], "b")
    assert bm.match_prefix(b) == 0


def test_salt_separates_models():
    assert chain_hashes(list(range(8)), 4, salt=1) != chain_hashes(list(range(8)), 4, salt=2)
    assert chain_hashes(list(range(9)), 4) == chain_hashes(list(range(8)), 4)


def test_double_free_is_an_error():
    bm = BlockManager(4, 4)
    ids = bm.allocate_blocks(2)
    bm.free_blocks(ids)
    with pytest.raises(RuntimeError, match="twice"):
        bm.free_blocks(ids)
