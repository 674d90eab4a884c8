"""The small pieces: block pool, config and spec validation, wire framing, handshake, page bookkeeping."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.kv_layout import KVLayout
from splitserve.kv_transfer import (BlockPool, BlockPoolExhausted, KVTransferConfig, LayerStreamer,
                                    SimpleBlockPool, TransferSpec, WorkerSpec, create_backend)
from splitserve.kv_transfer import pages, wire
from splitserve.kv_transfer.handshake import layout_info, mismatch
from splitserve.proto.v1 import kv_transfer_pb2 as pb


def test_simple_block_pool_allocates_lowest_ids_and_refuses_without_side_effects():
    pool = SimpleBlockPool(8)
    assert isinstance(pool, BlockPool)
    assert pool.allocate(3) == [0, 1, 2]
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(6)
    assert pool.num_free == 5
    pool.free([1])
    assert pool.allocate(2) == [1, 3]
    with pytest.raises(ValueError, match="double free"):
        pool.free([7])


@pytest.mark.parametrize("field,value", [("timeout_s", 0), ("poll_interval_s", -1), ("worker_id", "a/b"),
                                         ("fake_failure_probability", 1.5), ("store_port", 70000)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        KVTransferConfig(**{field: value})


def test_spec_validation():
    with pytest.raises(ValueError, match="num_tokens"):
        TransferSpec("r", WorkerSpec("p"), WorkerSpec("d"), 0)
    with pytest.raises(ValueError, match="same worker"):
        TransferSpec("r", WorkerSpec("p"), WorkerSpec("p"), 5)
    with pytest.raises(ValueError, match="request_id"):
        TransferSpec("a/b", WorkerSpec("p"), WorkerSpec("d"), 5)
    assert TransferSpec("r", WorkerSpec("p"), WorkerSpec("d"), 33).num_blocks(16) == 3


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend 'rdma' is not one of"):
        create_backend(KVTransferConfig(backend="rdma"), SimpleBlockPool(4))


def test_torch_dist_needs_a_store():
    with pytest.raises(ValueError, match="store_port"):
        create_backend(KVTransferConfig(backend="torch_dist"), SimpleBlockPool(4))


def test_header_frame_round_trip_and_limit():
    rid = "r" * 128
    n = 0
    while n < wire.MAX_RUNS and wire.batch_fits((n + 1) * wire.run_size_bound(rid)):
        n += 1                                                       # the largest batch a sender builds
    assert n >= 16
    runs = [pb.KVPageRun(request_id=rid, attempt=2**31, layer=2**31, first=2**31, count=2**31, num_heads=2**31,
                         payload_bytes=2**63) for _ in range(n)]
    h = pb.KVPageHeader(kind=pb.KVPageHeader.PAGES, runs=runs)
    frame = wire.encode_header(h, torch.device("cpu"))
    assert frame.dtype == torch.uint8 and frame.numel() == wire.HEADER_BYTES
    assert wire.decode_header(frame) == h
    with pytest.raises(ValueError, match="does not fit"):
        wire.encode_header(pb.KVPageHeader(error="x" * wire.HEADER_BYTES), torch.device("cpu"))


def test_handshake_names_every_differing_field():
    a = KVLayout(num_layers=30, num_blocks=8, block_size=16, num_kv_heads=3, head_dim=64, dtype=torch.float32)
    b = KVLayout(num_layers=30, num_blocks=99, block_size=32, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16,
                 tp_rank=0, tp_size=1)
    assert mismatch(layout_info(a, "smollm2"), layout_info(a, "smollm2")) is None
    error = mismatch(layout_info(a, "smollm2"), layout_info(b, "llama"))
    assert "refused before any page moved" in error
    for part in ("model_id: sender='smollm2' receiver='llama'", "dtype: sender='float32' receiver='bfloat16'",
                 "block_size: sender=16 receiver=32"):
        assert part in error
    assert "num_blocks" not in error                      # pool sizes may differ


def test_ready_blocks_holds_back_the_partial_block_until_the_sequence_is_done():
    assert pages.ready_blocks(num_tokens=45, tokens_ready=24, block_size=4) == 6
    assert pages.ready_blocks(num_tokens=45, tokens_ready=26, block_size=4) == 6
    assert pages.ready_blocks(num_tokens=45, tokens_ready=45, block_size=4) == 12
    assert pages.next_range([3, 4, 5, 9], already=0, num_ready_blocks=5) == (0, 2)
    assert pages.next_range([3, 4, 5, 9], already=2, num_ready_blocks=12) == (2, 4)


def test_gather_is_a_view_for_contiguous_blocks_and_a_copy_otherwise():
    layout = KVLayout(num_layers=2, num_blocks=10, block_size=4, num_kv_heads=3, head_dim=8, dtype=torch.float32)
    kv = layout.allocate()
    kv.copy_(torch.randn(layout.shape))
    run = pages.gather(kv, 1, [4, 5, 6], slice(0, 3))               # one run, every head: K and V in one view
    assert run.shape == (3, 2, 4, 3, 8) and run.is_contiguous() and run.data_ptr() == kv[1, 0, 4].data_ptr()
    assert torch.equal(run[:, 0], kv[1, 0, 4:7]) and torch.equal(run[:, 1], kv[1, 1, 4:7])
    part = pages.gather(kv, 1, [6, 2], slice(1, 2))
    assert part.is_contiguous() and torch.equal(part, kv[1][:, [6, 2]][:, :, :, 1:2].transpose(0, 1))
    out = layout.allocate()
    pages.scatter(out, 1, [0, 9], slice(1, 2), part)
    assert torch.equal(out[1, :, [0, 9]][..., 1:2, :], kv[1, :, [6, 2]][..., 1:2, :])
    assert out[1, :, [0, 9]][..., 0, :].abs().sum() == 0 and out[0].abs().sum() == 0


def test_a_cache_not_laid_out_by_the_layout_still_gathers_by_copy():
    kv = torch.randn(2, 2, 10, 4, 3, 8)                             # plain [L, 2, N, ...] memory: no pair runs
    assert pages.run_view(kv, 1, 4, 3) is None
    run = pages.gather(kv, 1, [4, 5, 6], slice(0, 3))
    assert torch.equal(run, kv[1, :, 4:7].transpose(0, 1))


def test_allocated_cache_keeps_the_logical_shape_with_k_and_v_of_a_page_adjacent():
    layout = KVLayout(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    kv = layout.allocate()
    assert tuple(kv.shape) == layout.shape and kv.abs().sum() == 0
    page = layout.block_size * layout.num_kv_heads * layout.head_dim
    assert kv[1].stride()[:2] == (page, 2 * page)                   # V right after K, then the next block
    assert kv[1, 1, 2].data_ptr() - kv[1, 0, 2].data_ptr() == page * kv.element_size()


def test_layer_streamer_fans_out_with_each_requests_progress():
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def layer_ready(self, layer, tokens):
            calls.append((self.name, layer, tokens))

    s = LayerStreamer()
    s.add(Recorder("a"), 64)
    s.add(Recorder("b"))
    s(0)
    s(1)
    assert calls == [("a", 0, 64), ("b", 0, None), ("a", 1, 64), ("b", 1, None)]
    s.clear()
    assert not s
