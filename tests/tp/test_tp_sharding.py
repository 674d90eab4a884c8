"""Sharding rules and the sharded model itself, on tiny random Llamas: TP ranks run as threads of this process,
each with its own Gloo group object (no default group), so uneven and replicated head splits are cheap to cover."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from tp_helpers import forward_logits
from splitserve.engine import dist as tp_dist
from splitserve.engine import tp
from splitserve.engine.kv_layout import kv_head_range
from splitserve.engine.layer_parallel import pair_layers
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.models.llama import LlamaForCausalLM


def test_smollm2_heads_split_by_whole_gqa_groups():
    # 9 query heads reading 3 KV heads (3 per KV head) on 2 ranks
    assert [tp.kv_heads_of_rank(3, 2, r) for r in range(2)] == [range(0, 2), range(2, 3)]
    assert [tp.q_heads_of_rank(9, 3, 2, r) for r in range(2)] == [range(0, 6), range(6, 9)]


@pytest.mark.parametrize("kv_heads", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group", [1, 2, 3, 4])
@pytest.mark.parametrize("tp_size", [1, 2, 3, 4, 8])
def test_every_query_head_lands_once_next_to_its_kv_head(kv_heads, group, tp_size):
    heads = kv_heads * group
    try:
        q = [tp.q_heads_of_rank(heads, kv_heads, tp_size, r) for r in range(tp_size)]
    except ValueError:
        assert (kv_heads < tp_size and tp_size % kv_heads) or group < tp_size // kv_heads
        return
    kv = [tp.kv_heads_of_rank(kv_heads, tp_size, r) for r in range(tp_size)]
    assert sorted(h for r in q for h in r) == list(range(heads))
    for qr, kr in zip(q, kv):
        assert len(qr) > 0 and all(h // group in kr for h in qr)
        assert len(qr) == len(kr) * (len(qr) // len(kr))          # the same GQA ratio on every rank
    # the KV layout's rule agrees wherever it is defined (it rejects uneven splits such as 3 heads on 2 ranks)
    try:
        assert kv == [kv_head_range(kv_heads, tp_size, r) for r in range(tp_size)]
    except ValueError:
        assert kv_heads >= tp_size and kv_heads % tp_size


# ---- the sharded model on a tiny random Llama ----------------------------------------------------------------
def tiny_llama(heads: int, kv_heads: int, layers: int = 4, vocab: int = 101, inter: int = 50) -> LlamaForCausalLM:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=48, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:          # non-trivial gains, so folding them into weights is exercised
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return model


def run_ranks(world: int, fn):
    """fn(group) on `world` threads, each holding rank r of one Gloo group; returns the results by rank. Each
    thread has its own store client: one client blocked in a rendezvous wait would hold up the others."""
    store = tp_dist.host_store()
    addr = f"127.0.0.1:{store.port}"
    results, errors = [None] * world, []

    def rank(r: int) -> None:
        try:
            results[r] = fn(tp_dist.join_group(addr, r, world, "cpu", 30.0, "tp/test"))
        except BaseException as e:   # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


TOKENS = [5, 17, 3, 99, 42, 8, 64, 23, 11, 7, 90, 33, 2, 71, 50, 19, 6, 28, 80]


@pytest.mark.parametrize("heads,kv_heads,tp_size", [(9, 3, 2), (4, 1, 2), (8, 2, 4), (6, 3, 3)])
@pytest.mark.parametrize("layer_range", [None, (0, 4)])
def test_sharded_logits_match_the_unsharded_model(heads, kv_heads, tp_size, layer_range, monkeypatch):
    base = tiny_llama(heads, kv_heads)
    expected = forward_logits(pair_layers(copy.deepcopy(base), layer_range), TOKENS)
    calls = []
    all_reduce = tp_dist.all_reduce
    monkeypatch.setattr(tp.tp_dist, "all_reduce", lambda t, g: (calls.append(1), all_reduce(t, g))[1])

    def rank(group):
        model = pair_layers(tp.shard_model(copy.deepcopy(base), group), layer_range)
        return forward_logits(model, TOKENS)

    got = run_ranks(tp_size, rank)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # 2 all-reduces per layer, or per pair of layers: 4 layers -> 8, 2 pairs -> 4 per forward, on every rank
    forwards = 1 + 3                      # forward_logits: one prefill, three decode steps
    assert len(calls) == tp_size * forwards * (4 if layer_range else 8)


def test_shard_after_layer_pairs_is_refused():
    model = pair_layers(tiny_llama(4, 2), (0, 2))
    with pytest.raises(ValueError, match="before layer-parallel"):
        run_ranks(1, lambda g: tp.shard_model(model, g))
