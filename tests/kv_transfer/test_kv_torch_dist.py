"""torch_dist between real processes (Gloo on CPU): each peer is a subprocess running kv_peer.py."""

from __future__ import annotations

import pytest
import torch

LAYOUT = dict(layers=6, num_blocks=96, block_size=4, head_dim=8)


def transfer(rid: str, src: str, dst: str, tokens: int, src_tp: int = 1, dst_tp: int = 1, **kw) -> dict:
    return dict(id=rid, src=src, src_tp=src_tp, dst=dst, dst_tp=dst_tp, tokens=tokens, **kw)


def test_pages_arrive_bit_identical_layer_by_layer_and_skip_cached_prefix(peers):
    # two requests share the pair link; prefill runs in two chunks; the receiver already holds a 3-block prefix
    ts = [transfer("r1", "prefill", "decode", 45, cached_blocks=3), transfer("r2", "prefill", "decode", 20)]
    common = dict(LAYOUT, dtype="float32", total_kv_heads=3, timeout_s=20, transfers=ts)
    peers.start("p", worker="prefill", tp_rank=0, tp_size=1, chunks=[24, 45], layer_sleep_s=0.04, fragment=True,
                **common)
    peers.start("d", worker="decode", tp_rank=0, tp_size=1, **common)
    res = peers.wait()
    p, d = res["p"], res["d"]
    for rid in ("r1", "r2"):
        rx = d["transfers"][f"recv:{rid}"]
        assert p["transfers"][f"send:{rid}"]["status"] == "done"
        assert rx["status"] == "done", rx["error"]
        assert rx["bit_identical"] and rx["prefix_untouched"]
        assert rx["completed_layers"] == list(range(LAYOUT["layers"]))
        times = rx["layer_times"]
        assert times == sorted(times)
        # streaming: layer 0 (final after the second chunk's layer 0) landed before the prefill computed its
        # last layer
        assert times[0] < p["layer_ready_times"][-1]
    assert p["free_at_end"] == p["baseline"]                       # the sender's lease ended: blocks back
    assert d["free_at_end"] == d["after_setup"]                    # the decode worker now owns its blocks


@pytest.mark.parametrize("heads", [4, 1], ids=["4-heads-split", "1-head-replicated"])
def test_tp_resharding_2_to_1_and_1_to_2(peers, heads):
    # worker "a" runs TP=2 (two processes), worker "b" TP=1; KV goes a->b (2->1) and b->a (1->2, like a drain)
    ts = [transfer("down", "a", "b", 30, src_tp=2, dst_tp=1), transfer("up", "b", "a", 27, src_tp=1, dst_tp=2)]
    common = dict(LAYOUT, dtype="float32", total_kv_heads=heads, timeout_s=20, transfers=ts)
    peers.start("a0", worker="a", tp_rank=0, tp_size=2, **common)
    peers.start("a1", worker="a", tp_rank=1, tp_size=2, **common)
    peers.start("b", worker="b", tp_rank=0, tp_size=1, **common)
    res = peers.wait()
    for name, rid in (("b", "down"), ("a0", "up"), ("a1", "up")):
        rx = res[name]["transfers"][f"recv:{rid}"]
        assert rx["status"] == "done", (name, rx["error"])
        assert rx["bit_identical"], name
    for name, rid in (("a0", "down"), ("a1", "down"), ("b", "up")):
        assert res[name]["transfers"][f"send:{rid}"]["status"] == "done", name
    received = {"b": 8, "a0": 7, "a1": 7}         # blocks of "down" (30 tokens) and "up" (27 tokens)
    for name, r in res.items():
        assert r["free_at_end"] == r["baseline"] - received[name], name   # sent blocks back, received ones kept


def _kill_when(peers, key: str, layers: int, victim: str) -> float:
    peers.wait_for_key(key, at_least=layers)
    return peers.kill(victim)


def test_sender_killed_mid_transfer_fails_receiver_within_deadline_and_frees_blocks(peers):
    timeout = 4.0
    ts = [transfer("k1", "prefill", "decode", 40)]
    common = dict(LAYOUT, dtype="float32", total_kv_heads=3, timeout_s=timeout, transfers=ts)
    peers.start("p", worker="prefill", tp_rank=0, tp_size=1, stall_after_layer=1, **common)
    peers.start("d", worker="decode", tp_rank=0, tp_size=1, **common)
    killed_at = _kill_when(peers, "progress/decode/0", 2, "p")
    d = peers.wait()["d"]
    rx = d["transfers"]["recv:k1"]
    assert rx["status"] == "failed"
    assert rx["seconds"] <= timeout + 0.5
    assert rx["ended_at"] - killed_at < timeout
    assert rx["completed_layers"] == [0, 1]
    assert d["free_at_end"] == d["baseline"]


def test_receiver_killed_mid_transfer_fails_sender_and_ends_its_lease(peers):
    timeout = 4.0
    ts = [transfer("k2", "prefill", "decode", 40)]
    common = dict(LAYOUT, dtype="float32", total_kv_heads=3, timeout_s=timeout, transfers=ts)
    peers.start("p", worker="prefill", tp_rank=0, tp_size=1, layer_sleep_s=0.3, **common)
    peers.start("d", worker="decode", tp_rank=0, tp_size=1, **common)
    _kill_when(peers, "progress/decode/0", 2, "d")
    p = peers.wait()["p"]
    tx = p["transfers"]["send:k2"]
    assert tx["status"] == "failed"
    assert tx["seconds"] <= timeout + 0.5
    assert p["free_at_end"] == p["baseline"]


def test_stalled_sender_fails_receiver_at_its_deadline(peers):
    timeout = 3.0
    ts = [transfer("s1", "prefill", "decode", 40)]
    common = dict(LAYOUT, dtype="float32", total_kv_heads=3, timeout_s=timeout, transfers=ts)
    peers.start("p", worker="prefill", tp_rank=0, tp_size=1, stall_after_layer=2, **common)
    peers.start("d", worker="decode", tp_rank=0, tp_size=1, **common)
    peers.procs["d"].wait(timeout=60)
    peers.kill("p")
    d = peers.wait()["d"]
    rx = d["transfers"]["recv:s1"]
    assert rx["status"] == "failed" and "deadline" in rx["error"]
    assert timeout - 0.1 <= rx["seconds"] <= timeout + 0.5
    assert d["free_at_end"] == d["baseline"]


def test_fingerprint_mismatch_is_refused_before_any_page_moves(peers):
    ts = [transfer("fp", "prefill", "decode", 40)]
    common = dict(LAYOUT, total_kv_heads=3, timeout_s=10, transfers=ts)
    peers.start("p", worker="prefill", tp_rank=0, tp_size=1, dtype="float32", **common)
    peers.start("d", worker="decode", tp_rank=0, tp_size=1, dtype="bfloat16", **common)
    res = peers.wait()
    tx, rx = res["p"]["transfers"]["send:fp"], res["d"]["transfers"]["recv:fp"]
    for end in (tx, rx):
        assert end["status"] == "failed"
        assert "fingerprint mismatch" in end["error"] and "dtype: sender='float32' receiver='bfloat16'" in end["error"]
        assert end["seconds"] < 5
    assert rx["completed_layers"] == [] and rx["untouched"]
    assert res["d"]["free_at_end"] == res["d"]["baseline"]
    assert res["p"]["free_at_end"] == res["p"]["baseline"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL pair groups need two CUDA devices")
def test_nccl_pair_moves_pages_between_gpus(peers):
    ts = [transfer("g1", "prefill", "decode", 45, cached_blocks=2)]
    common = dict(LAYOUT, dtype="bfloat16", total_kv_heads=4, timeout_s=30, transfers=ts)
    peers.start("p", worker="prefill", tp_rank=0, tp_size=1, device="cuda:0", chunks=[20, 45], **common)
    peers.start("d", worker="decode", tp_rank=0, tp_size=1, device="cuda:1", **common)
    res = peers.wait()
    rx = res["d"]["transfers"]["recv:g1"]
    assert rx["status"] == "done", rx["error"]
    assert rx["bit_identical"] and rx["prefix_untouched"]
    assert res["p"]["transfers"]["send:g1"]["status"] == "done"
