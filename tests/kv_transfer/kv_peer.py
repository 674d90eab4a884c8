"""One worker rank of a multi-process kv_transfer test: `python kv_peer.py '<json>'` (not collected by pytest).

The JSON names this rank (worker, tp), the KV layout, the rendezvous store and a list of transfers; the rank
sends the ones whose src is its worker and receives those whose dst is. Every request's logical KV is a seeded
random tensor both sides can regenerate, so the receiver checks pages bit for bit. Results go to `out` as JSON.
Knobs for fault tests: `stall_after_layer` (sender stops sending and sleeps until killed), `layer_sleep_s`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from datetime import timedelta

import torch
from torch.distributed import TCPStore

from splitserve.engine.kv_layout import KVLayout, kv_head_range
from splitserve.kv_transfer import (KVTransferConfig, SimpleBlockPool, TransferSpec, WorkerSpec,
                                    create_backend)

SENTINEL = 7.0


def logical_kv(request_id: str, layers: int, tokens: int, bs: int, heads: int, dim: int, dtype) -> torch.Tensor:
    """[layers, 2, blocks*bs, heads, dim]: the request's KV as if computed by one rank holding every head."""
    g = torch.Generator().manual_seed(zlib.crc32(request_id.encode()))
    nb = math.ceil(tokens / bs)
    return torch.randn(layers, 2, nb * bs, heads, dim, generator=g).to(dtype)


def main(args: dict) -> None:
    dtype = getattr(torch, args["dtype"])
    device = torch.device(args.get("device", "cpu"))
    tp_rank, tp_size, heads = args["tp_rank"], args["tp_size"], args["total_kv_heads"]
    mine = kv_head_range(heads, tp_size, tp_rank)
    layout = KVLayout(num_layers=args["layers"], num_blocks=args["num_blocks"], block_size=args["block_size"],
                      num_kv_heads=len(mine), head_dim=args["head_dim"], dtype=dtype, total_kv_heads=heads,
                      tp_rank=tp_rank, tp_size=tp_size)
    bs, L = layout.block_size, layout.num_layers
    pool = SimpleBlockPool(layout.num_blocks)
    store = TCPStore("127.0.0.1", args["store_port"], is_master=False, timeout=timedelta(seconds=10))
    config = KVTransferConfig(backend="torch_dist", worker_id=args["worker"], model_id=args.get("model_id", "m"),
                              store_port=args["store_port"], timeout_s=args["timeout_s"], connect_timeout_s=5.0)
    backend = create_backend(config, pool)
    kv = layout.allocate(device)
    backend.register_kv_cache(kv, layout)

    senders, receivers, cached = {}, {}, {}
    if args.get("fragment"):                      # leave holes so source / destination runs are not contiguous
        held = pool.allocate(pool.num_free // 2)
        pool.free(held[1::2])
    baseline = pool.num_free
    for t in args["transfers"]:
        spec = TransferSpec(t["id"], WorkerSpec(t["src"], t["src_tp"]), WorkerSpec(t["dst"], t["dst_tp"]),
                            t["tokens"])
        ref = logical_kv(t["id"], L, t["tokens"], bs, heads, layout.head_dim, dtype).to(device)
        if t["dst"] == args["worker"]:
            prefix = pool.allocate(t.get("cached_blocks", 0))
            kv[:, :, prefix] = SENTINEL
            cached[t["id"]] = prefix
            receivers[t["id"]] = (backend.create_receiver(spec, prefix), ref, time.time())
        if t["src"] == args["worker"]:
            src = pool.allocate(spec.num_blocks(bs))
            for i, b in enumerate(src):
                kv[:, :, b] = ref[:, :, i * bs:(i + 1) * bs, mine.start:mine.stop]
            senders[t["id"]] = (backend.create_sender(spec, src), time.time())
    after_setup = pool.num_free

    progress_key = f"progress/{args['worker']}/{tp_rank}"
    result: dict = {"layer_ready_times": [], "transfers": {}}
    layer_times: dict[str, dict[int, float]] = {rid: {} for rid in receivers}
    ended: dict[str, float] = {}                  # "send:<id>" / "recv:<id>" -> when poll() first said terminal

    def poll_receivers() -> None:
        for rid, (rx, _, _) in receivers.items():
            for layer in rx.completed_layers():
                layer_times[rid].setdefault(layer, time.time())
            if rx.poll().terminal:
                ended.setdefault(f"recv:{rid}", time.time())
        for rid, (tx, _) in senders.items():
            if tx.poll().terminal:
                ended.setdefault(f"send:{rid}", time.time())
        if receivers:
            store.set(progress_key, str(min(len(rx.completed_layers()) for rx, _, _ in receivers.values())))

    chunks = args.get("chunks") or [None]
    for chunk_end in chunks:
        for layer in range(L):
            if args.get("stall_after_layer") is not None and layer > args["stall_after_layer"]:
                store.set(f"stalled/{args['worker']}/{tp_rank}", "1")
                time.sleep(120)                   # a hung prefill; the test SIGKILLs us
            end = time.time() + args.get("layer_sleep_s", 0.0)
            while True:                           # emulated compute, still polling like a step loop
                poll_receivers()
                if time.time() >= end:
                    break
                time.sleep(0.002)
            for tx, _ in senders.values():
                tx.layer_ready(layer, chunk_end)
            result["layer_ready_times"].append(time.time())

    hard_stop = time.time() + args["timeout_s"] + 8
    while time.time() < hard_stop:
        poll_receivers()
        if len(ended) == len(receivers) + len(senders):
            break
        time.sleep(0.002)

    for rid, (tx, t0) in senders.items():
        result["transfers"][f"send:{rid}"] = {"status": tx.poll().value, "error": tx.error,
                                              "seconds": ended.get(f"send:{rid}", time.time()) - t0,
                                              "ended_at": ended.get(f"send:{rid}")}
    for rid, (rx, ref, t0) in receivers.items():
        status = rx.poll()
        entry = {"status": status.value, "error": rx.error, "ended_at": ended.get(f"recv:{rid}"),
                 "seconds": ended.get(f"recv:{rid}", time.time()) - t0,
                 "completed_layers": rx.completed_layers(),
                 "layer_times": [layer_times[rid].get(layer) for layer in range(L)]}
        table, n_cached = rx.block_table, len(cached[rid])
        if status.value == "done":
            same = all(torch.equal(kv[:, :, b], ref[:, :, i * bs:(i + 1) * bs, mine.start:mine.stop])
                       for i, b in enumerate(table) if i >= n_cached)
            entry["bit_identical"] = bool(same)
        entry["prefix_untouched"] = bool(all((kv[:, :, b] == SENTINEL).all() for b in cached[rid]))
        entry["untouched"] = bool(all((kv[:, :, b] == 0).all() for b in table[n_cached:]))
        result["transfers"][f"recv:{rid}"] = entry
    result.update(baseline=baseline, after_setup=after_setup, free_at_end=pool.num_free,
                  cached_blocks=sum(len(c) for c in cached.values()))
    with open(args["out"], "w") as f:
        json.dump(result, f)
    backend.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)      # skip interpreter teardown (about a second with torch loaded); results are on disk
