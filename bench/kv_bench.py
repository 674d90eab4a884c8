"""`splitserve bench kv`: KV-page streaming through kv_transfer's torch_dist backend against raw torch.distributed.

Two worker processes (a prefill-like sender and a decode-like receiver) talk over loopback; this process hosts
the rendezvous store, as the router does. The KV is the default model's: SmolLM2-135M, 30 layers x 3 KV heads x
head_dim 64, block_size 16.

1. Throughput, for each dtype and prompt length: the same two processes move the prompt's whole KV
       raw          one torch.distributed send/recv per layer of the layer's K+V bytes (a 2-rank Gloo group),
                    every receive posted before the sender starts: the wire's best case, with no headers,
                    handshake, gather or scatter; both sides block in wait()
       kv_transfer  sender.layer_ready(l) for every layer of a registered KV tensor; the receiver's pages land
                    in its pre-allocated blocks; both sides block in wait(); contiguous blocks (fresh pools) and
                    fragmented ones (every other block: the gather/scatter path)
   Prompts of up to 2048 tokens run 4 x --reps rounds, longer ones --reps / 2 (at least 3).
   Time = sender's first send -> receiver sees all pages in place (both clocks are CLOCK_MONOTONIC). The
   handshake (plan, reply through the store) is timed separately; "ack" is when the sender learns of it.
2. Overlap, SYNTHETIC COMPUTE: a matmul loop of a configured duration per layer stands in for a fast (GPU-like)
   forward pass, so that compute and transfer are of the same size:
       compute   30 layers of compute, no transfer (TTFT of prefill alone)
       serial    compute all layers, then send everything (no layer-wise streaming)
       streamed  compute layer l, then layer_ready(l) (the layer hook), transfer overlapping layer l+1
   hidden = share of the transfer that streaming removes from the critical path.
3. TTFT with the REAL model (kv_ttft.py): the PrefillWorker's own layer hook streaming to a receiver process,
   against the same prefill with no transfer.

    splitserve bench kv [--tokens 1024,8192] [--dtypes float32,bfloat16] [--reps 5] [--compute-ms-per-layer 5]
                        [--ttft-tokens 1024] [--ttft-reps 3] [--ttft-dtype auto] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from splitserve.bench import kv_ttft

MODEL = dict(num_layers=30, total_kv_heads=3, head_dim=64, block_size=16)
MODEL_NAME = "SmolLM2-135M"


def _cases(tokens: list[int], dtypes: list[str]) -> list[dict]:
    return [dict(dtype=d, tokens=t, fragmented=f) for d in dtypes for t in tokens for f in (False, True)]


# ---- the two worker processes -----------------------------------------------------------------------------
def _worker(args: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed import PrefixStore, TCPStore

    from splitserve.engine.kv_layout import KVLayout
    from splitserve.kv_transfer import (KVTransferConfig, SimpleBlockPool, TransferSpec, TransferStatus,
                                        WorkerSpec, create_backend)

    sending = args["role"] == "send"
    rank = 0 if sending else 1
    store = TCPStore("127.0.0.1", args["port"], is_master=False, timeout=timedelta(seconds=60))
    raw = dist.ProcessGroupGloo(PrefixStore("bench/raw", store), rank, 2, timedelta(seconds=120))
    flag = torch.zeros(1)

    def barrier() -> None:
        ops = [(raw.send, 1), (raw.recv, 1)] if sending else [(raw.recv, 0), (raw.send, 0)]
        for op, peer in ops:
            op([flag], peer, 0).wait()

    def spin(end, until) -> float:
        while not until(end.poll()):
            time.sleep(0.0002)
        return time.perf_counter()

    out: dict = {"throughput": [], "overlap": []}
    bs, L = MODEL["block_size"], MODEL["num_layers"]
    for case in _cases(args["tokens"], args["dtypes"]) + [dict(args["overlap"], overlap=True)]:
        dtype = getattr(torch, case["dtype"])
        nb = -(-case["tokens"] // bs)
        layout = KVLayout(num_layers=L, num_blocks=2 * nb + 2, block_size=bs, num_kv_heads=MODEL["total_kv_heads"],
                          head_dim=MODEL["head_dim"], dtype=dtype)
        kv = layout.allocate()
        if sending:
            kv.fill_(1.5)
        pool = SimpleBlockPool(layout.num_blocks)
        if case["fragmented"]:
            pool.free(pool.allocate(2 * nb)[1::2])          # free every other block: no contiguous runs left
        config = KVTransferConfig(backend="torch_dist", worker_id="bench-prefill" if sending else "bench-decode",
                                  model_id=MODEL_NAME, store_port=args["port"], timeout_s=120)
        backend = create_backend(config, pool)
        backend.register_kv_cache(kv, layout)
        layer_bytes = 2 * case["tokens"] * MODEL["total_kv_heads"] * MODEL["head_dim"] * kv.element_size()
        raw_bufs = [torch.ones(layer_bytes // kv.element_size(), dtype=dtype) for _ in range(L)]
        mm = torch.randn(256, 256)
        torch.set_num_threads(1)
        compute_s = case.get("compute_ms_per_layer", 0.0) / 1e3
        # raw and kv_transfer (or the three overlap variants) alternate, so load changes hit both alike
        rounds = ["compute", "serial", "streamed"] if case.get("overlap") else ["raw", "kvx"]
        # a short transfer takes milliseconds and one scheduling hiccup can double it: more reps steady the median
        reps = 4 * args["reps"] if case["tokens"] <= 2048 else max(3, args["reps"] // 2)
        for i, kind in enumerate(["warmup"] + rounds * reps):
            spec = TransferSpec(f"{case['dtype']}-{case['tokens']}-{int(case['fragmented'])}-{i}",
                                WorkerSpec("bench-prefill"), WorkerSpec("bench-decode"), case["tokens"])
            barrier()
            rec: dict = {"kind": kind, **case}
            if kind == "raw":
                if sending:
                    rec["t0"] = time.perf_counter()
                    for w in [raw.send([b], 1, 0) for b in raw_bufs]:
                        w.wait()
                else:
                    for w in [raw.recv([b], 0, 0) for b in raw_bufs]:
                        w.wait()
                    rec["t_done"] = time.perf_counter()
            elif kind == "compute":
                if sending:
                    rec["t0"] = time.perf_counter()
                    for _ in range(L):
                        _compute(mm, compute_s)
                    rec["t_done"] = time.perf_counter()
            elif not sending:
                rx = backend.create_receiver(spec)
                rx.wait(120)                      # sleeps until the link thread finishes it, as raw's wait()
                rec["t_done"] = time.perf_counter()
                rec["ok"] = rx.poll() is TransferStatus.DONE and bool((kv[:, :, rx.block_table] == 1.5).all())
                pool.free(rx.block_table)
            else:
                t_create = time.perf_counter()
                tx = backend.create_sender(spec, pool.allocate(nb))
                rec["handshake"] = spin(tx, lambda s: s is not TransferStatus.BOOTSTRAPPING) - t_create
                rec["t0"] = time.perf_counter()
                for layer in range(L):
                    if kind == "streamed" or (kind == "warmup" and case.get("overlap")):
                        _compute(mm, compute_s)
                        tx.layer_ready(layer)
                if kind == "serial":
                    for _ in range(L):
                        _compute(mm, compute_s)
                    rec["t_compute_end"] = time.perf_counter()
                tx.all_layers_ready()
                tx.wait(120)
                rec["t_ack"] = time.perf_counter()
                rec["ok"] = tx.poll() is TransferStatus.DONE
            if kind != "warmup":
                rec["mb"] = layer_bytes * L / 1e6
                out["overlap" if case.get("overlap") else "throughput"].append(rec)
        barrier()
        backend.close()
    Path(args["out"]).write_text(json.dumps(out))


def _compute(mm, seconds: float) -> None:
    """One layer's stand-in forward: matmuls on one thread until `seconds` have passed."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        mm @ mm


# ---- orchestration and report ---------------------------------------------------------------------------
def run(json_out: bool = False, tokens: tuple[int, ...] = (1024, 8192),
        dtypes: tuple[str, ...] = ("float32", "bfloat16"), reps: int = 5, compute_ms_per_layer: float = 5.0,
        overlap_tokens: int = 8192, overlap_dtype: str = "bfloat16", ttft_tokens: tuple[int, ...] = (1024,),
        ttft_reps: int = 3, ttft_dtype: str = "auto") -> dict:
    """Runs the parts, prints a table (or JSON when json_out), returns the results. An empty `tokens` skips the
    throughput part (and the synthetic overlap with it); an empty `ttft_tokens` skips the real-model TTFT."""
    if reps < 1 or ttft_reps < 1 or any(t <= 0 for t in tokens + ttft_tokens) or compute_ms_per_layer < 0:
        raise ValueError("reps >= 1, positive token counts and compute_ms_per_layer >= 0 are required")
    result: dict = {"model": MODEL_NAME, **MODEL, "transport": "gloo/loopback"}
    if tokens:
        overlap = dict(dtype=overlap_dtype, tokens=overlap_tokens, fragmented=False,
                       compute_ms_per_layer=compute_ms_per_layer)
        send, recv = _spawn(dict(part="throughput", tokens=list(tokens), dtypes=list(dtypes), reps=reps,
                                 overlap=overlap))
        result["throughput"] = _throughput(send["throughput"], recv["throughput"])
        result["overlap"] = _overlap(send["overlap"], recv["overlap"], overlap)
    if ttft_tokens:
        send, recv = _spawn(dict(part="ttft", tokens=list(ttft_tokens), reps=ttft_reps, dtype=ttft_dtype, seed=7))
        result["ttft"] = kv_ttft.summarize(send, recv)
    print(json.dumps(result, indent=2) if json_out else _table(result))
    return result


def _spawn(common: dict) -> tuple:
    """Runs the two worker processes of one part against a rendezvous store hosted here; their JSON results."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    tmp = Path(tempfile.mkdtemp(prefix="kv-bench-"))
    procs = {role: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                     json.dumps(dict(common, port=store.port, role=role,
                                                     out=str(tmp / f"{role}.json")))],
                                    env=dict(os.environ, OMP_NUM_THREADS="1"))
             for role in ("send", "recv")}
    for role, p in procs.items():
        if p.wait(timeout=3600) != 0:
            raise RuntimeError(f"kv bench {common['part']} {role} worker exited with {p.returncode}")
    return tuple(json.loads((tmp / f"{r}.json").read_text()) for r in ("send", "recv"))


def _merge(send: list[dict], recv: list[dict]) -> list[dict]:
    return [{**r, **s, "t_done": r.get("t_done", s.get("t_done")), "ok": s.get("ok", True) and r.get("ok", True)}
            for s, r in zip(send, recv)]


def _throughput(send: list[dict], recv: list[dict]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for t in _merge(send, recv):
        row = rows.setdefault((t["dtype"], t["tokens"]), {"dtype": t["dtype"], "tokens": t["tokens"], "mb": t["mb"],
                                                          "ok": True})
        frag = "frag_" if t["fragmented"] else ""
        row.setdefault(f"_{frag}{t['kind']}", []).append(t["t_done"] - t["t0"])
        row["ok"] &= t["ok"]
        if t["kind"] == "kvx" and not t["fragmented"]:
            row.setdefault("_hs", []).append(t["handshake"])
            row.setdefault("_ack", []).append(t["t_ack"] - t["t_done"])
    out = []
    for row in rows.values():
        # raw and kv_transfer alternate, so rep i of each ran moments apart: their ratio sees one load level
        paired = statistics.median(r / k for r, k in zip(row["_raw"], row["_kvx"]))
        med = {k: statistics.median(row.pop(k)) for k in [k for k in row if k.startswith("_")]}
        gbs = lambda s: row["mb"] / 1e3 / s   # noqa: E731
        out.append(dict(row, raw_gbs=gbs(med["_raw"]), kvx_gbs=gbs(med["_kvx"]), frag_gbs=gbs(med["_frag_kvx"]),
                        ratio=med["_raw"] / med["_kvx"], paired_ratio=paired,
                        frag_ratio=med["_frag_raw"] / med["_frag_kvx"],
                        handshake_ms=med["_hs"] * 1e3, ack_ms=med["_ack"] * 1e3))
    return out


def _overlap(send: list[dict], recv: list[dict], cfg: dict) -> dict:
    by: dict[str, list[float]] = {}
    ok = True
    for t in _merge(send, recv):
        by.setdefault(t["kind"], []).append(t["t_done"] - t["t0"])
        ok &= t["ok"]
    c, s, st = (statistics.median(by[k]) for k in ("compute", "serial", "streamed"))
    transfer = s - c
    return dict(cfg, variant="synthetic-compute", compute_ms=c * 1e3, serial_ms=s * 1e3, streamed_ms=st * 1e3,
                exposed_transfer_ms=(st - c) * 1e3, hidden=(s - st) / transfer if transfer > 0 else 0.0, ok=ok)


def _table(r: dict) -> str:
    lines: list[str] = []
    if "throughput" in r:
        lines += [f"KV streaming throughput: {r['model']} KV ({r['num_layers']} layers x {r['total_kv_heads']} KV "
                  f"heads x {r['head_dim']}, block {r['block_size']}), {r['transport']}, sender and receiver processes",
                  f"{'dtype':9} {'tokens':>6} {'MB':>7} {'raw GB/s':>9} {'kvx GB/s':>9} {'ratio':>6} {'paired':>6} "
                  f"{'frag GB/s':>9} {'ratio':>6} {'handshake ms':>12} {'ack ms':>7} ok",
                  "  (ratio = kv_transfer / raw torch.distributed, medians of interleaved reps; paired = median of "
                  "rep-by-rep ratios; frag: every other block)"]
        for t in r["throughput"]:
            lines.append(f"{t['dtype']:9} {t['tokens']:>6} {t['mb']:>7.1f} {t['raw_gbs']:>9.2f} {t['kvx_gbs']:>9.2f} "
                         f"{t['ratio']:>6.2f} {t['paired_ratio']:>6.2f} {t['frag_gbs']:>9.2f} {t['frag_ratio']:>6.2f} "
                         f"{t['handshake_ms']:>12.1f} {t['ack_ms']:>7.1f} {t['ok']}")
        o = r["overlap"]
        lines += ["", f"Layer-wise overlap, SYNTHETIC compute ({o['compute_ms_per_layer']:g} ms of matmuls per layer "
                  f"stand in for a fast forward pass), {o['tokens']} tokens {o['dtype']}",
                  f"  compute alone (TTFT without transfer)         {o['compute_ms']:8.1f} ms",
                  f"  compute, then transfer (no streaming)         {o['serial_ms']:8.1f} ms",
                  f"  compute with layer_ready per layer (streamed) {o['streamed_ms']:8.1f} ms   "
                  f"ratio {o['streamed_ms'] / o['compute_ms']:.3f}",
                  f"  transfer exposed after compute when streamed  {o['exposed_transfer_ms']:8.1f} ms",
                  f"  share of the transfer hidden behind compute   {100 * o['hidden']:7.0f} %   ok={o['ok']}"]
    for row in r.get("ttft", []):
        lines += [""] + kv_ttft.table(row)
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", default="1024,8192", help="throughput prompt lengths ('' skips the part)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compute-ms-per-layer", type=float, default=5.0, help="synthetic overlap variant")
    ap.add_argument("--ttft-tokens", default="1024", help="real-model TTFT prompt lengths ('' skips the part)")
    ap.add_argument("--ttft-reps", type=int, default=3)
    ap.add_argument("--ttft-dtype", default="auto", help="the engine's dtype (auto: as `splitserve serve`)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        (kv_ttft.worker if spec["part"] == "ttft" else _worker)(spec)
        return 0
    run(args.json, _ints(args.tokens), tuple(args.dtypes.split(",")), args.reps, args.compute_ms_per_layer,
        ttft_tokens=_ints(args.ttft_tokens), ttft_reps=args.ttft_reps, ttft_dtype=args.ttft_dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
