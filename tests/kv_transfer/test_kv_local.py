"""The local transport: both ends in one process, same plan / resharding / handshake as torch_dist."""

from __future__ import annotations

import time

import pytest
import torch

from splitserve.engine.kv_layout import KVLayout, kv_head_range
from splitserve.kv_transfer import (BlockPoolExhausted, KVTransferConfig, SimpleBlockPool, TransferSpec,
                                    TransferStatus, WorkerSpec, create_backend)
from splitserve.kv_transfer.local import LocalHub

L, BS, DIM = 3, 4, 8


class Worker:
    def __init__(self, hub: LocalHub, worker: str, heads: int, tp_rank: int = 0, tp_size: int = 1,
                 dtype=torch.float32, model_id: str = "m", num_blocks: int = 32) -> None:
        mine = kv_head_range(heads, tp_size, tp_rank)
        self.layout = KVLayout(num_layers=L, num_blocks=num_blocks, block_size=BS, num_kv_heads=len(mine),
                               head_dim=DIM, dtype=dtype, total_kv_heads=heads, tp_rank=tp_rank, tp_size=tp_size)
        self.mine = mine
        self.pool = SimpleBlockPool(num_blocks)
        self.kv = self.layout.allocate()
        from splitserve.kv_transfer.local import LocalBackend
        self.backend = LocalBackend(KVTransferConfig(backend="local", worker_id=worker, model_id=model_id,
                                                     timeout_s=5), self.pool, hub)
        self.backend.register_kv_cache(self.kv, self.layout)

    def fill(self, ref: torch.Tensor, blocks: list[int]) -> None:
        for i, b in enumerate(blocks):
            self.kv[:, :, b] = ref[:, :, i * BS:(i + 1) * BS, self.mine.start:self.mine.stop]

    def holds(self, ref: torch.Tensor, table: list[int], start: int = 0) -> bool:
        return all(torch.equal(self.kv[:, :, b], ref[:, :, i * BS:(i + 1) * BS, self.mine.start:self.mine.stop])
                   for i, b in enumerate(table) if i >= start)


def reference(tokens: int, heads: int, dtype=torch.float32) -> torch.Tensor:
    nb = -(-tokens // BS)
    return torch.randn(L, 2, nb * BS, heads, DIM, generator=torch.Generator().manual_seed(tokens)).to(dtype)


def spec(rid: str, tokens: int, src_tp: int = 1, dst_tp: int = 1, **kw) -> TransferSpec:
    return TransferSpec(rid, WorkerSpec("p", src_tp), WorkerSpec("d", dst_tp), tokens, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_layer_streaming_copies_only_final_pages_and_skips_the_cached_prefix(dtype):
    hub = LocalHub()
    p, d = Worker(hub, "p", 2, dtype=dtype), Worker(hub, "d", 2, dtype=dtype)
    ref = reference(30, 2, dtype)
    prefix = d.pool.allocate(2)
    d.fill(ref, prefix)                                 # already here from the decode side's prefix cache
    rx = d.backend.create_receiver(spec("r", 30), prefix)
    src = p.pool.allocate(8)
    p.fill(ref, src)
    tx = p.backend.create_sender(spec("r", 30), src)
    assert rx.poll() is tx.poll() is TransferStatus.TRANSFERRING
    tx.layer_ready(0, 16)                               # chunk 1: blocks 0-3 of layer 0 final; 0-1 cached
    assert d.holds(ref[:, :, :16], rx.block_table[:4]) is False   # layers 1-2 not sent yet
    assert torch.equal(d.kv[0, :, rx.block_table[2]], p.kv[0, :, src[2]])
    assert d.kv[0, :, rx.block_table[4]].abs().sum() == 0
    for layer in range(L):
        tx.layer_ready(layer, 16)
    assert rx.completed_layers() == [] and rx.poll() is TransferStatus.TRANSFERRING
    for layer in range(L):
        tx.layer_ready(layer, 30)                       # chunk 2 ends the prompt (partial last block too)
        assert rx.completed_layers() == list(range(layer + 1))
    assert rx.poll() is tx.poll() is TransferStatus.DONE
    assert d.holds(ref, rx.block_table) and rx.block_table[:2] == prefix
    assert p.pool.num_free == 32 and d.pool.num_free == 32 - 8


@pytest.mark.parametrize("heads,src_tp,dst_tp", [(4, 2, 1), (4, 1, 2), (1, 2, 1), (1, 1, 2), (2, 2, 2)])
def test_tensor_parallel_resharding(heads, src_tp, dst_tp):
    hub = LocalHub()
    ps = [Worker(hub, "p", heads, r, src_tp) for r in range(src_tp)]
    ds = [Worker(hub, "d", heads, r, dst_tp) for r in range(dst_tp)]
    ref = reference(21, heads)
    s = spec("tp", 21, src_tp, dst_tp)
    rxs = [d.backend.create_receiver(s) for d in ds]
    txs = []
    for p in ps:
        src = p.pool.allocate(6)
        p.fill(ref, src)
        txs.append(p.backend.create_sender(s, src))
    for tx in txs:
        tx.all_layers_ready()
    assert all(e.poll() is TransferStatus.DONE for e in rxs + txs)
    assert all(d.holds(ref, rx.block_table) for d, rx in zip(ds, rxs))


def test_receiver_created_after_the_sender_finished_computing_still_gets_everything():
    hub = LocalHub()
    p, d = Worker(hub, "p", 2), Worker(hub, "d", 2)
    ref = reference(9, 2)
    src = p.pool.allocate(3)
    p.fill(ref, src)
    tx = p.backend.create_sender(spec("late", 9), src)
    tx.all_layers_ready()
    assert tx.poll() is TransferStatus.BOOTSTRAPPING
    rx = d.backend.create_receiver(spec("late", 9))
    assert rx.poll() is tx.poll() is TransferStatus.DONE and d.holds(ref, rx.block_table)


def test_fingerprint_mismatch_fails_both_ends_before_any_copy():
    hub = LocalHub()
    p, d = Worker(hub, "p", 2, model_id="smollm2"), Worker(hub, "d", 2, model_id="llama")
    src = p.pool.allocate(3)
    p.kv[:, :, src] = 1.0
    rx = d.backend.create_receiver(spec("fp", 9))
    tx = p.backend.create_sender(spec("fp", 9), src)
    tx.all_layers_ready()
    assert rx.poll() is tx.poll() is TransferStatus.FAILED
    assert "fingerprint mismatch" in rx.error and "model_id" in tx.error
    assert d.kv.abs().sum() == 0 and d.pool.num_free == 32 and p.pool.num_free == 32


def test_deadline_and_abort_free_blocks_on_both_sides():
    hub = LocalHub()
    p, d = Worker(hub, "p", 2), Worker(hub, "d", 2)
    rx = d.backend.create_receiver(spec("slow", 9, timeout_s=0.05))
    assert d.pool.num_free == 29
    time.sleep(0.06)
    assert rx.poll() is TransferStatus.FAILED and "deadline" in rx.error and d.pool.num_free == 32
    rx = d.backend.create_receiver(spec("ab", 9))
    tx = p.backend.create_sender(spec("ab", 9), p.pool.allocate(3))
    tx.layer_ready(0)
    tx.abort("prefill preempted")
    assert rx.poll() is TransferStatus.FAILED and "prefill preempted" in rx.error
    assert p.pool.num_free == d.pool.num_free == 32


def test_pool_exhaustion_is_raised_and_allocates_nothing():
    hub = LocalHub()
    d = Worker(hub, "d", 2, num_blocks=4)
    with pytest.raises(BlockPoolExhausted):
        d.backend.create_receiver(spec("big", 40))
    assert d.pool.num_free == 4


def test_registry_builds_the_local_backend():
    b = create_backend(KVTransferConfig(backend="local", worker_id="x"), SimpleBlockPool(4))
    assert b.name == "local"


def test_transfer_seconds_run_from_the_handshake_to_the_end():
    hub = LocalHub()
    p, d = Worker(hub, "p", 2), Worker(hub, "d", 2)
    rx = d.backend.create_receiver(spec("timed", 9))
    assert rx.transfer_seconds() is None                 # still bootstrapping: the sender is not there yet
    time.sleep(0.05)                                     # waiting for the prefill to start is not transfer time
    tx = p.backend.create_sender(spec("timed", 9), p.pool.allocate(3))
    assert rx.poll() is TransferStatus.TRANSFERRING and rx.transfer_seconds() is None
    time.sleep(0.02)
    tx.all_layers_ready()
    assert rx.poll() is TransferStatus.DONE
    assert 0.015 <= rx.transfer_seconds() < 0.045
    rx = d.backend.create_receiver(spec("gone", 9, timeout_s=0.03))
    time.sleep(0.04)
    assert rx.poll() is TransferStatus.FAILED and rx.transfer_seconds() == 0.0   # no handshake: nothing moved
