"""engine/dist.py: explicit group objects, never the default group, and collectives bounded by the timeout."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from splitserve.engine import dist as tp_dist


def test_groups_are_explicit_objects_and_collectives_time_out():
    store = tp_dist.host_store()
    addr = f"127.0.0.1:{store.port}"
    groups = [None, None]

    def join(r):
        groups[r] = tp_dist.join_group(addr, r, 2, "cpu", timeout_s=1.5, prefix="tp/timeout-test")

    threads = [threading.Thread(target=join, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not dist.is_initialized()              # no default group: kv_transfer's pair groups never clash
    assert [g.rank() for g in groups] == [0, 1] and groups[0].size() == 2
    started = time.monotonic()
    with pytest.raises(RuntimeError):             # rank 1 never joins this all-reduce: an error, not a hang
        tp_dist.all_reduce(torch.ones(4), groups[0])
    assert time.monotonic() - started < 15


def test_bad_rendezvous_address_is_a_clear_error():
    with pytest.raises(ValueError, match="host:port"):
        tp_dist.connect_store("localhost")
    with pytest.raises(ValueError, match="rank"):
        tp_dist.new_group(tp_dist.host_store(), 2, 2, "cpu")
