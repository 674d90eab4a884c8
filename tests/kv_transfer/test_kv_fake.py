"""The fake transport: instant success, or seeded failures that still return every block."""

from __future__ import annotations

import torch

from splitserve.engine.kv_layout import KVLayout
from splitserve.kv_transfer import (KVTransferConfig, SimpleBlockPool, TransferSpec, TransferStatus, WorkerSpec,
                                    create_backend)

LAYOUT = KVLayout(num_layers=2, num_blocks=64, block_size=4, num_kv_heads=1, head_dim=4, dtype=torch.float32)


def backend(worker: str, p: float = 0.0, seed: int = 0):
    pool = SimpleBlockPool(LAYOUT.num_blocks)
    b = create_backend(KVTransferConfig(backend="fake", worker_id=worker, fake_failure_probability=p,
                                        fake_seed=seed), pool)
    b.register_kv_cache(LAYOUT.allocate(), LAYOUT)
    return b, pool


def spec(i: int) -> TransferSpec:
    return TransferSpec(f"r{i}", WorkerSpec("p"), WorkerSpec("d"), 10)


def test_success_at_first_poll_with_real_block_accounting():
    (p, ppool), (d, dpool) = backend("p"), backend("d")
    rx = d.create_receiver(spec(0), cached_block_ids=[])
    tx = p.create_sender(spec(0), ppool.allocate(3))
    assert rx.poll() is TransferStatus.DONE and tx.poll() is TransferStatus.DONE
    assert rx.completed_layers() == [0, 1] and len(rx.block_table) == 3
    assert ppool.num_free == 64 and dpool.num_free == 61


def test_failure_knob_fails_the_chosen_fraction_and_frees_blocks():
    d, pool = backend("d", p=0.25, seed=7)
    statuses = []
    for i in range(400):
        rx = d.create_receiver(spec(i))
        statuses.append(rx.poll())
        if rx.poll() is TransferStatus.DONE:
            pool.free(rx.block_table)                # the decode worker finishes the request
        else:
            assert "failure_probability=0.25" in rx.error
    assert pool.num_free == 64
    assert 70 <= statuses.count(TransferStatus.FAILED) <= 130
    d2, pool2 = backend("d", p=0.25, seed=7)           # same seed, same faults
    again = []
    for i in range(400):
        rx = d2.create_receiver(spec(i))
        again.append(rx.poll())
        if again[-1] is TransferStatus.DONE:
            pool2.free(rx.block_table)
    assert again == statuses


def test_always_failing():
    p, pool = backend("p", p=1.0)
    tx = p.create_sender(spec(0), pool.allocate(3))
    tx.all_layers_ready()
    assert tx.poll() is TransferStatus.FAILED and pool.num_free == 64
