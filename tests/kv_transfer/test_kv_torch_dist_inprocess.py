"""torch_dist with both workers in this process (Gloo pair groups between threads): lifecycle edge cases that
need no process boundary — fully cached requests, aborts on either side, link reuse and re-formation."""

from __future__ import annotations

import time

import pytest
import torch
from torch.distributed import TCPStore

from splitserve.engine.kv_layout import KVLayout
from splitserve.kv_transfer import (KVTransferConfig, SimpleBlockPool, TransferSpec, TransferStatus, WorkerSpec,
                                    create_backend)

LAYOUT = KVLayout(num_layers=3, num_blocks=32, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)


class Side:
    def __init__(self, store: TCPStore, worker: str, timeout_s: float = 5.0) -> None:
        self.pool = SimpleBlockPool(LAYOUT.num_blocks)
        self.kv = LAYOUT.allocate()
        self.kv.copy_(torch.randn(LAYOUT.shape))
        self.backend = create_backend(KVTransferConfig(backend="torch_dist", worker_id=worker, model_id="m",
                                                       store_port=store.port, timeout_s=timeout_s,
                                                       connect_timeout_s=3.0), self.pool)
        self.backend.register_kv_cache(self.kv, LAYOUT)


@pytest.fixture
def pair():
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    p, d = Side(store, "p"), Side(store, "d")
    yield store, p, d
    p.backend.close()
    d.backend.close()


def spec(rid: str, tokens: int = 10, timeout_s: float | None = None) -> TransferSpec:
    return TransferSpec(rid, WorkerSpec("p"), WorkerSpec("d"), tokens, timeout_s=timeout_s)


def settle(*ends, limit: float = 10.0) -> list[TransferStatus]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        statuses = [e.poll() for e in ends]
        if all(s.terminal for s in statuses):
            return statuses
        time.sleep(0.002)
    raise AssertionError(f"not terminal after {limit}s: {[e.poll() for e in ends]}")


def move(p: Side, d: Side, rid: str, tokens: int = 10, cached: list[int] | None = None):
    rx = d.backend.create_receiver(spec(rid, tokens), cached or [])
    src = p.pool.allocate(spec(rid, tokens).num_blocks(LAYOUT.block_size))
    tx = p.backend.create_sender(spec(rid, tokens), src)
    tx.all_layers_ready()
    return tx, rx, src


def test_transfers_reuse_one_pair_link_and_move_exact_pages(pair):
    store, p, d = pair
    for i in range(3):
        tx, rx, src = move(p, d, f"r{i}")
        assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE]
        assert torch.equal(d.kv[:, :, rx.block_table], p.kv[:, :, src])
    assert store.add("kvx/link/p/0->d/0/gen", 0) == 1             # formed once, never re-formed
    assert p.pool.num_free == LAYOUT.num_blocks


def test_fully_cached_request_needs_no_pages(pair):
    _, p, d = pair
    cached = d.pool.allocate(3)
    before = d.kv.clone()
    tx, rx, _ = move(p, d, "hit", tokens=12, cached=cached)
    assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE]
    assert rx.block_table == cached and torch.equal(d.kv, before)
    assert rx.completed_layers() == [0, 1, 2]


def test_receiver_abort_fails_sender_and_frees_both_sides(pair):
    _, p, d = pair
    rx = d.backend.create_receiver(spec("ab"))
    tx = p.backend.create_sender(spec("ab"), p.pool.allocate(3))
    tx.layer_ready(0)
    rx.abort("client went away")
    assert settle(tx, rx) == [TransferStatus.FAILED, TransferStatus.FAILED]
    assert "client went away" in tx.error
    assert p.pool.num_free == d.pool.num_free == LAYOUT.num_blocks
    tx, rx, _ = move(p, d, "after-abort")                          # the link is still good
    assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE]


def test_sender_abort_mid_stream_fails_receiver(pair):
    _, p, d = pair
    rx = d.backend.create_receiver(spec("sa"))
    tx = p.backend.create_sender(spec("sa"), p.pool.allocate(3))
    tx.layer_ready(0)
    while rx.completed_layers() != [0]:
        rx.poll()
    tx.abort("prefill preempted")
    assert settle(tx, rx) == [TransferStatus.FAILED, TransferStatus.FAILED]
    assert "prefill preempted" in rx.error
    assert p.pool.num_free == d.pool.num_free == LAYOUT.num_blocks


def test_receiver_deadline_while_sender_idle_then_link_still_works(pair):
    _, p, d = pair
    rx = d.backend.create_receiver(spec("slow", timeout_s=0.5))
    tx = p.backend.create_sender(spec("slow", timeout_s=0.5), p.pool.allocate(3))   # never calls layer_ready
    assert settle(tx, rx) == [TransferStatus.FAILED, TransferStatus.FAILED]
    assert "deadline" in rx.error
    tx, rx, _ = move(p, d, "next")
    assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE], (tx.error, rx.error)


def test_silent_peer_breaks_the_link_and_a_restarted_worker_reforms_it(pair, monkeypatch):
    # (a SIGKILLed peer is detected at once by the OS closing its sockets: see test_kv_torch_dist.py; a peer
    # that goes silent is detected when its open stream outlives the transfer's deadline + grace)
    store, p, d = pair
    monkeypatch.setattr(d.backend._ctx, "grace_s", 0.3)
    tx, rx, _ = move(p, d, "first")
    assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE]
    rx = d.backend.create_receiver(spec("victim", timeout_s=0.5))
    tx = p.backend.create_sender(spec("victim", timeout_s=0.5), p.pool.allocate(3))
    while rx.poll() is not TransferStatus.TRANSFERRING:
        time.sleep(0.002)
    p.backend.close()                       # the prefill worker goes silent: no pages, no ABORT
    assert settle(rx, limit=2.0) == [TransferStatus.FAILED]
    assert d.pool.num_free == LAYOUT.num_blocks - 3           # only "first"'s blocks stay with the decode side
    link = d.backend._ctx.links.recv_link("p/0", "d/0")
    token = link.token
    deadline = time.monotonic() + 3
    while link.token == token and time.monotonic() < deadline:
        time.sleep(0.01)                    # the receiver declares the link dead once deadline + grace passed
    p2 = Side(store, "p")                   # restarted under the same worker id
    try:
        tx, rx, src = move(p2, d, "recovered")
        assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE]
        assert torch.equal(d.kv[:, :, rx.block_table], p2.kv[:, :, src])
        assert store.add("kvx/link/p/0->d/0/gen", 0) == 2          # a fresh group, not the broken one
    finally:
        p2.backend.close()


def test_workers_restarted_under_the_same_id_get_fresh_groups(pair):
    store, p, d = pair
    tx, rx, _ = move(p, d, "before")
    assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE]
    p.backend.close()
    p2 = Side(store, "p")                   # a new sender-side link never reuses a generation's rendezvous keys
    d.backend.close()
    d2 = Side(store, "d")                   # a new receiver-side link has a new token: the sender re-forms
    try:
        for i in range(2):
            tx, rx, src = move(p2, d2, f"after{i}")
            assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE]
            assert torch.equal(d2.kv[:, :, rx.block_table], p2.kv[:, :, src])
        assert store.add("kvx/link/p/0->d/0/gen", 0) == 2
    finally:
        p2.backend.close()
        d2.backend.close()


def test_sender_lease_expires_when_receiver_never_shows_up(pair):
    _, p, _ = pair
    tx = p.backend.create_sender(spec("orphan", timeout_s=0.3), p.pool.allocate(3))
    tx.all_layers_ready()
    assert settle(tx) == [TransferStatus.FAILED]
    assert "deadline" in tx.error and p.pool.num_free == LAYOUT.num_blocks


def test_nothing_is_left_behind_after_mixed_outcomes(pair):
    _, p, d = pair
    ends = []
    tx, rx, _ = move(p, d, "ok")
    ends += [tx, rx]
    tx, rx, _ = move(p, d, "cached", tokens=8, cached=d.pool.allocate(2))
    ends += [tx, rx]
    rx = d.backend.create_receiver(spec("aborted"))
    tx = p.backend.create_sender(spec("aborted"), p.pool.allocate(3))
    tx.layer_ready(0)
    rx.abort("client gone")
    ends += [tx, rx]
    rx = d.backend.create_receiver(spec("lonely", timeout_s=0.3))   # no sender ever comes
    ends.append(rx)
    settle(*ends)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and (d.backend._ctx.control.num_watches or p.backend._ctx.control.num_watches
                                           or d.backend._ctx.links.recv_link("p/0", "d/0")._ends):
        time.sleep(0.01)
    assert d.backend._ctx.control.num_watches == p.backend._ctx.control.num_watches == 0
    assert d.backend._ctx.links.recv_link("p/0", "d/0")._ends == {}
    assert p.pool.num_free == LAYOUT.num_blocks


def test_unreachable_store_is_a_clear_error():
    with pytest.raises(ConnectionError, match="rendezvous store"):
        b = create_backend(KVTransferConfig(backend="torch_dist", store_port=1, connect_timeout_s=0.5),
                           SimpleBlockPool(4))
        b.register_kv_cache(LAYOUT.allocate(), LAYOUT)


def test_wait_sleeps_until_terminal_and_gives_up_at_its_timeout(pair):
    _, p, d = pair
    tx, rx, src = move(p, d, "waited", tokens=12)
    assert rx.wait(10) is TransferStatus.DONE and tx.wait(10) is TransferStatus.DONE
    assert torch.equal(d.kv[:, :, rx.block_table], p.kv[:, :, src])
    lonely = d.backend.create_receiver(spec("lonely-wait", timeout_s=0.5))     # no sender ever comes
    assert lonely.wait(0.01) is TransferStatus.BOOTSTRAPPING                    # its own timeout, not the deadline
    assert lonely.wait(10) is TransferStatus.FAILED and "deadline" in lonely.error
    assert d.pool.num_free == LAYOUT.num_blocks - len(rx.block_table)


def test_one_batch_mixing_in_place_and_staged_runs_lands_exact_pages(pair):
    _, p, d = pair
    held = d.pool.allocate(LAYOUT.num_blocks)
    dst = [0, 1, 2, 3, 4, 6, 8, 10, 12, 14]          # the first half one run (in place), the rest scattered
    d.pool.free(dst)
    held = [b for b in held if b not in dst]
    rx = d.backend.create_receiver(spec("mixed", tokens=40))
    assert rx.block_table == dst
    src = p.pool.allocate(10)
    tx = p.backend.create_sender(spec("mixed", tokens=40), src)
    while tx.poll() is TransferStatus.BOOTSTRAPPING:
        time.sleep(0.001)
    for layer in range(LAYOUT.num_layers):          # first half of every layer, then the rest: runs queue up
        tx.layer_ready(layer, 20)
    tx.all_layers_ready()
    assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE]
    assert torch.equal(d.kv[:, :, rx.block_table], p.kv[:, :, src])
    assert rx.completed_layers() == [0, 1, 2]
    d.pool.free(held)


def test_control_plane_polls_slow_watches_rarely_until_heated(pair):
    from splitserve.kv_transfer.control_plane import ControlPlane, StoreAddress

    store, _, _ = pair
    plane = ControlPlane(StoreAddress("127.0.0.1", store.port, 5.0), 0.002, "t")
    fired: list[bytes] = []
    try:
        slow = plane.watch("cp/slow", lambda _, v: fired.append(v), interval_s=60.0)
        time.sleep(0.05)                             # its first check (at once) found nothing
        store.set("cp/slow", b"1")
        time.sleep(0.3)
        assert fired == []                           # next check in a minute
        plane.heat(slow)
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.005)
        assert fired == [b"1"] and plane.num_watches == 0 and not store.check(["cp/slow"])
    finally:
        plane.close()


def test_control_plane_checks_its_watches_when_the_writer_rings(pair):
    """A watch fires within milliseconds of the writer's ring (a datagram naming its key), however long its
    own safety-net poll; a key written without a ring waits for that poll, and a ring checks only the watches on
    its key. A ring that comes before its watch exists is not lost."""
    from splitserve.kv_transfer.control_plane import ControlPlane, StoreAddress, doorbell_key

    store, _, _ = pair
    address = StoreAddress("127.0.0.1", store.port, 5.0)
    plane = ControlPlane(address, 60.0, "bell-test/0")
    writer = ControlPlane(address, 60.0, "bell-writer/0")
    fired: list[tuple[bytes, float]] = []

    def ring(key: str, value: bytes) -> None:      # as a peer does it: on its own control thread, with its store
        writer.submit(lambda st: (st.set(key, value), writer.ring(st, "bell-test/0", key)))

    try:
        assert store.check([doorbell_key("bell-test/0")])          # published for peers to find
        plane.watch("cp/quiet", lambda _, v: fired.append((v, time.monotonic())), hot=True)
        plane.watch("cp/rung", lambda _, v: fired.append((v, time.monotonic())), hot=True)
        time.sleep(0.1)                              # both checked once at creation: nothing there yet
        store.set("cp/quiet", b"q")                  # no ring: seen at the next safety-net check, in a minute
        time.sleep(0.3)
        assert fired == [] and plane.num_watches == 2
        rung_at = time.monotonic()
        ring("cp/rung", b"r")
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.001)
        assert [v for v, _ in fired] == [b"r"] and fired[0][1] - rung_at < 0.05
        time.sleep(0.1)
        assert plane.num_watches == 1 and store.check(["cp/quiet"])    # the ring named one key only

        ring("cp/early", b"e")                       # rung before anyone watches it
        time.sleep(0.1)
        plane.watch("cp/early", lambda _, v: fired.append((v, time.monotonic())))   # not hot, 60 s poll
        deadline = time.monotonic() + 5
        while len(fired) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert [v for v, _ in fired] == [b"r", b"e"]
    finally:
        t0 = time.monotonic()
        plane.close()
        writer.close()
    assert time.monotonic() - t0 < 1.0 and not plane._thread.is_alive()


def test_blocks_parked_by_a_write_in_flight_come_back_on_reclaim(pair):
    """A receiver that fails while a page is still landing in its blocks parks their release until the writer is
    done; the writer hands them over on its own thread, and an owner with no transfer left to poll gets them
    back from `reclaim()` (which workers call every tick), not only from its next transfer."""
    _, _, d = pair
    baseline = d.pool.num_free
    rx = d.backend.create_receiver(spec("parked", 10), [])
    with rx.life.lock:
        rx._writing += 1                    # an in-place receive into these blocks is in flight
    rx.abort("request aborted")
    assert rx.poll() is TransferStatus.FAILED and d.pool.num_free < baseline    # parked, not freed under the write
    with rx.life.lock:
        rx._writes_ended(1)                 # the link thread: the receive ended
    assert d.pool.num_free < baseline       # handed to the owner's thread, which has not run yet
    d.backend.reclaim()
    assert d.pool.num_free == baseline


class _FailingRecvs:
    """A pair group whose `fail_at`-th recv (counting from 1) raises, as a peer dying mid-batch makes Gloo do."""

    def __init__(self, group, fail_at: int) -> None:
        self._group, self._left = group, fail_at

    def recv(self, tensors, src, tag):
        self._left -= 1
        if self._left == 0:
            raise RuntimeError("injected: connection reset by peer")
        return self._group.recv(tensors, src, tag)

    def __getattr__(self, name):
        return getattr(self._group, name)


def test_a_receive_that_fails_to_post_mid_batch_gives_the_blocks_back(pair):
    """The link posts one receive per page run after handing the receiver its target; when a later post raises
    (the peer died), every target already handed out must be accounted as lost. Before, the in-place write count
    stayed up, the failed receiver parked its blocks for a writer that never came, and they never went back."""
    _, p, d = pair
    tx, rx, _ = move(p, d, "warm")                  # forms the pair link
    assert settle(tx, rx) == [TransferStatus.DONE, TransferStatus.DONE]
    d.pool.free(rx.block_table)                     # the owner's now; the sender gave its blocks back
    baseline = d.pool.num_free
    link = d.backend._ctx.links.recv_link("p/0", "d/0")
    link.group = _FailingRecvs(link.group, fail_at=3)   # the header, the first run, then the second run's post
    tx, rx, _ = move(p, d, "cut", tokens=10)
    statuses = settle(tx, rx, limit=15)
    assert statuses[1] is TransferStatus.FAILED and "injected" in (rx.error or "")
    deadline = time.monotonic() + 5
    while d.pool.num_free != baseline and time.monotonic() < deadline:
        d.backend.reclaim()
        time.sleep(0.01)
    assert d.pool.num_free == baseline and rx._writing == 0
