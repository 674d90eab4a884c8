"""Per-rank KV transfer of tensor-parallel workers (cluster/tp_kv.py), in one process over the `local` transport:
rank 0's ends are mirrored on the follower ranks by ops, every rank moves its own head shard (resharded between
TP degrees), and rank 0 reports DONE only when every rank is done."""

from __future__ import annotations

import pytest
import torch

from splitserve.cluster.tp_kv import (DictatedPool, FollowerKV, LayersReady, ShardedKVBackend, StartRecv,
                                      StartSend)
from splitserve.engine.kv_layout import KVLayout, kv_head_range
from splitserve.kv_transfer import KVTransferConfig, SimpleBlockPool, TransferSpec, TransferStatus, WorkerSpec
from splitserve.kv_transfer.local import LocalBackend, LocalHub

L, BS, DIM, HEADS = 3, 4, 8, 3          # SmolLM2-like: 3 KV heads split 2 + 1 at TP=2


class InlineChannel:
    """A RankChannel whose followers live in this process: ops apply at flush, statuses are polled directly."""

    def __init__(self, followers: list[FollowerKV]) -> None:
        self.followers, self.num_followers = followers, len(followers)
        self.queue, self.sent, self._open = [], [], {}

    def post(self, op) -> None:
        self.queue.append(op)

    def flush(self) -> None:
        ops, self.queue = self.queue, []
        self.sent += ops
        for f in self.followers:
            for op in ops:
                f.apply(op)

    def open(self, key) -> None:
        self._open[key] = {}

    def verdicts(self, key) -> dict:
        for f in self.followers:
            for s in f.poll():
                if s.key in self._open:
                    self._open[s.key][s.rank] = s
        return dict(self._open.get(key, {}))

    def close(self, key) -> None:
        self._open.pop(key, None)


class Rank:
    def __init__(self, hub: LocalHub, worker: str, tp: int, rank: int, pool) -> None:
        self.mine = kv_head_range(HEADS, tp, rank)
        self.layout = KVLayout(num_layers=L, num_blocks=32, block_size=BS, num_kv_heads=len(self.mine),
                               head_dim=DIM, dtype=torch.float32, total_kv_heads=HEADS, tp_rank=rank, tp_size=tp)
        self.kv = self.layout.allocate()
        self.backend = LocalBackend(KVTransferConfig(backend="local", worker_id=worker, timeout_s=5), pool, hub)
        self.backend.register_kv_cache(self.kv, self.layout)

    def fill(self, ref: torch.Tensor, blocks: list[int]) -> None:
        for i, b in enumerate(blocks):
            self.kv[:, :, b] = ref[:, :, i * BS:(i + 1) * BS, self.mine.start:self.mine.stop]

    def holds(self, ref: torch.Tensor, table: list[int]) -> bool:
        return all(torch.equal(self.kv[:, :, b], ref[:, :, i * BS:(i + 1) * BS, self.mine.start:self.mine.stop])
                   for i, b in enumerate(table))


class Worker:
    """Rank 0 with a real block pool and a ShardedKVBackend; ranks 1.. with DictatedPools, as in a cluster."""

    def __init__(self, hub: LocalHub, name: str, tp: int) -> None:
        self.pool = SimpleBlockPool(32)
        self.ranks = [Rank(hub, name, tp, 0, self.pool)]
        followers = []
        for r in range(1, tp):
            pool = DictatedPool()
            self.ranks.append(Rank(hub, name, tp, r, pool))
            followers.append(FollowerKV(self.ranks[r].backend, pool, r))
        self.channel = InlineChannel(followers)
        self.kv = ShardedKVBackend(self.ranks[0].backend, self.channel) if tp > 1 else self.ranks[0].backend


def reference(tokens: int) -> torch.Tensor:
    nb = -(-tokens // BS)
    return torch.randn(L, 2, nb * BS, HEADS, DIM, generator=torch.Generator().manual_seed(tokens))


@pytest.mark.parametrize("src_tp,dst_tp", [(2, 2), (2, 1), (1, 2)])
def test_every_rank_moves_its_shard_and_rank0_waits_for_all(src_tp, dst_tp):
    hub = LocalHub()
    p, d = Worker(hub, "p", src_tp), Worker(hub, "d", dst_tp)
    tokens = 30
    ref = reference(tokens)
    spec = TransferSpec("r", WorkerSpec("p", src_tp), WorkerSpec("d", dst_tp), tokens)
    rx = d.kv.create_receiver(spec, [])
    src = p.pool.allocate(spec.num_blocks(BS))
    for rank in p.ranks:                             # every rank computed its heads into the same block ids
        rank.fill(ref, src)
    tx = p.kv.create_sender(spec, src)
    if dst_tp > 1:                                   # the follower receives into rank 0's allocated blocks
        start = next(op for op in d.channel.sent if isinstance(op, StartRecv))
        assert list(start.new_block_ids) == rx.block_table
    free_before = p.pool.num_free
    for layer in range(L):
        tx.layer_ready(layer, tokens)
    assert rx.poll() is TransferStatus.DONE
    assert tx.poll() is TransferStatus.DONE
    assert p.pool.num_free == free_before + len(src)  # the lease ends once every rank is done
    for rank in d.ranks:
        assert rank.holds(ref, rx.block_table)


def test_source_blocks_stay_pinned_until_every_follower_has_sent():
    hub = LocalHub()
    p, d = Worker(hub, "p", 2), Worker(hub, "d", 1)
    ref = reference(12)
    spec = TransferSpec("r", WorkerSpec("p", 2), WorkerSpec("d", 1), 12)
    rx = d.kv.create_receiver(spec, [])
    src = p.pool.allocate(3)
    for rank in p.ranks:
        rank.fill(ref, src)
    tx = p.kv.create_sender(spec, src)
    held = []
    p.channel.flush = lambda: held.extend(p.channel.queue) or p.channel.queue.clear()   # follower lags behind
    for layer in range(L):
        tx.layer_ready(layer, 12)
    assert any(isinstance(op, LayersReady) for op in held)
    free = p.pool.num_free
    assert tx.poll() is TransferStatus.TRANSFERRING            # rank 0 is done, rank 1 has not sent yet
    assert rx.poll() is not TransferStatus.DONE
    assert p.pool.num_free == free                              # so rank 0 keeps the source blocks
    for op in held:                                             # the follower catches up
        p.channel.followers[0].apply(op)
    assert rx.poll() is TransferStatus.DONE and tx.poll() is TransferStatus.DONE
    assert p.pool.num_free == free + 3
    assert d.ranks[0].holds(ref, rx.block_table)


def test_a_failed_follower_end_fails_rank0_and_frees_its_blocks():
    hub = LocalHub()
    d = Worker(hub, "d", 2)
    spec = TransferSpec("r", WorkerSpec("p", 1), WorkerSpec("d", 2), 12, timeout_s=5)
    baseline = d.pool.num_free
    rx = d.kv.create_receiver(spec, [])
    assert d.pool.num_free == baseline - 3
    d.channel.followers[0].ends[("recv", "r", 0)].abort("rank 1 lost its link")
    assert rx.poll() is TransferStatus.FAILED
    assert "rank 1 lost its link" in rx.error
    assert d.pool.num_free == baseline


def test_a_follower_that_cannot_create_its_end_reports_failed():
    hub = LocalHub()
    p = Worker(hub, "p", 2)
    spec = TransferSpec("r", WorkerSpec("p", 2), WorkerSpec("d", 1), 12)
    follower = p.channel.followers[0]
    follower.apply(StartSend(spec, (1, 2)))                     # 2 blocks for a 3-block sequence
    [status] = follower.poll()
    assert status.status is TransferStatus.FAILED and status.rank == 1 and "blocks" in status.error
