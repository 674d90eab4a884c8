"""`splitserve bench kv`, part 2: time to first token of the REAL default model with and without KV streaming.

Two processes, as in production: a prefill worker (the real `PrefillWorker` around a real `LLMEngine`, stepped
by hand instead of by its loop thread) and a decode-side receiver (a KV tensor of the same layout registered
with its own torch_dist backend; the decode engine's weights play no part in receiving). Per repetition, with
the variants interleaved so load changes hit all of them alike:

    prefill    engine.step() until the first token; no KV transfer at all   (TTFT of prefill alone)
    serial     the same, then every layer handed to a sender at once         (transfer after compute)
    streamed   PrefillWorker.tick(): each layer's pages are handed to the sender by the layer hook as soon as
               the forward wrote them, so they travel while the next layers compute
    TTFT       prefill start -> first token sampled AND every page in place at the receiver
    exposed    how long after the first token the last page lands (0 when it lands first): the transfer's share
               of TTFT; the prefill process's CPU time per variant shows what streaming costs the compute

Every repetition uses a fresh random prompt (no prefix-cache hits). torch runs the forward on one thread,
leaving the second core to the transport (both processes share this machine).
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from datetime import timedelta
from pathlib import Path

VARIANTS = ("prefill", "streamed", "serial")


def worker(args: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed import PrefixStore, TCPStore

    from splitserve.engine.kv_layout import KVLayout
    from splitserve.kv_transfer import (KVTransferConfig, SimpleBlockPool, TransferSpec, TransferStatus,
                                        WorkerSpec, create_backend)

    torch.set_num_threads(1)
    sending = args["role"] == "send"
    store = TCPStore("127.0.0.1", args["port"], is_master=False, timeout=timedelta(seconds=600))
    group = dist.ProcessGroupGloo(PrefixStore("bench/ttft", store), 0 if sending else 1, 2, timedelta(seconds=600))
    flag = torch.zeros(1)

    def barrier() -> None:
        for op, peer in ([(group.send, 1), (group.recv, 1)] if sending else [(group.recv, 0), (group.send, 0)]):
            op([flag], peer, 0).wait()

    reps = args["reps"]
    kv_config = dict(backend="torch_dist", model_id="", store_port=args["port"], timeout_s=600)
    if sending:
        worker_, engine = _prefill_worker(args, kv_config)
        layout = engine.runner.layout
        store.set("bench/ttft/layout", json.dumps(dict(
            num_layers=layout.num_layers, num_blocks=layout.num_blocks, block_size=layout.block_size,
            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=str(layout.dtype).split(".")[1],
            model_id=engine.runner.fingerprint)))
    else:
        info = json.loads(store.get("bench/ttft/layout"))
        model_id = info.pop("model_id")
        layout = KVLayout(**dict(info, dtype=getattr(torch, info["dtype"])))
        backend = create_backend(KVTransferConfig(**dict(kv_config, worker_id="bench-decode", model_id=model_id)),
                                 SimpleBlockPool(layout.num_blocks))
        kv = layout.allocate()
        backend.register_kv_cache(kv, layout)
    out: list[dict] = []
    rng = random.Random(args["seed"])
    rounds = [(t, k) for t in args["tokens"] for k in ["warmup-streamed", "warmup-prefill"]
              + [v for r in range(reps) for v in VARIANTS[r % 3:] + VARIANTS[:r % 3]]]   # rotated: no order bias
    for i, (tokens, kind) in enumerate(rounds):
        prompt = [rng.randrange(100, 30000) for _ in range(tokens)]
        spec = TransferSpec(f"ttft-{i}", WorkerSpec("bench-prefill"), WorkerSpec("bench-decode"), tokens)
        moves = not kind.endswith("prefill")
        barrier()
        rec: dict = {"kind": kind, "tokens": tokens}
        if not sending:
            if moves:
                rx = backend.create_receiver(spec)
                while not rx.poll().terminal:
                    time.sleep(0.0005)
                rec["t_kv"] = time.perf_counter()
                rec["ok"] = rx.poll() is TransferStatus.DONE
                backend.pool.free(rx.block_table)
        else:
            rec.update(_prefill_once(worker_, engine, prompt, spec, kind), dtype=str(layout.dtype).split(".")[1])
        out.append(rec)
    barrier()
    if sending:
        worker_.kv.close()
    else:
        backend.close()
    Path(args["out"]).write_text(json.dumps(out))


def _prefill_worker(args: dict, kv_config: dict):
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.kv_transfer import KVTransferConfig
    from splitserve.prefill_workers.worker import PrefillWorker

    blocks = 2 * (-(-max(args["tokens"]) // 16)) + 16
    engine = LLMEngine(EngineConfig(dtype=args["dtype"], num_kv_blocks=blocks, max_num_seqs=4, verbose=False),
                       reserve_full_prompt=True)
    config = KVTransferConfig(**dict(kv_config, worker_id="bench-prefill", model_id=engine.runner.fingerprint))
    return PrefillWorker("bench-prefill", engine.config, config, engine=engine), engine


def _prefill_once(worker, engine, prompt: list[int], spec, kind: str) -> dict:
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.work import WorkRequest

    params = SamplingParams(max_tokens=1, temperature=0.0)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if kind.endswith("streamed"):
        fut = worker.prefill(WorkRequest(spec.request_id, prompt, params, seed=1), spec)
        while not fut.done():
            worker.tick()
        t_token = time.perf_counter()
        tx = worker.senders.get(spec.request_id)
    else:
        engine.add_request(spec.request_id, prompt, dataclasses.replace(params, seed=1))
        table: list[int] = []

        def pin(batch) -> None:                   # serial: the sender's lease keeps the blocks past the finish
            for seq in batch.seqs:
                if kind == "serial" and seq.request_id == spec.request_id and not table:
                    engine.block_manager.pin_blocks(seq.block_table)
                    table.extend(seq.block_table)

        while engine.has_unfinished:
            engine.step(before_execute=pin)
        t_token = time.perf_counter()
        tx = None
        if kind == "serial":
            tx = worker.kv.create_sender(spec, table)
            tx.all_layers_ready()
    while tx is not None and not tx.poll().terminal:
        time.sleep(0.0005)
    ok = tx is None or tx.error is None
    worker.tick()                               # lets the worker forget a finished sender
    return {"t0": t0, "t_token": t_token, "ok": ok, "cpu_s": time.process_time() - cpu0}


def summarize(send: list[dict], recv: list[dict]) -> list[dict]:
    """One row per prompt length."""
    return [_summarize_one([(s, r) for s, r in zip(send, recv) if s["tokens"] == t], t, send[0]["dtype"])
            for t in dict.fromkeys(s["tokens"] for s in send)]


def _summarize_one(pairs: list[tuple[dict, dict]], tokens: int, dtype: str) -> dict:
    by: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    lag: list[float] = []
    ok = True
    pairs = [(s, r) for s, r in pairs if not s["kind"].startswith("warmup")]
    for s, r in pairs:
        end = max(s["t_token"], r.get("t_kv", 0.0))
        by.setdefault(s["kind"], []).append(end - s["t0"])
        cpu.setdefault(s["kind"], []).append(s["cpu_s"])
        ok &= s["ok"] and r.get("ok", True)
        if s["kind"] == "streamed":
            lag.append(r["t_kv"] - s["t_token"])
    med = {k: statistics.median(v) * 1e3 for k, v in by.items()}
    # streamed / prefill of the same round (seconds apart, so under the same load), then their median
    paired = statistics.median(st / pf for st, pf in zip(by["streamed"], by["prefill"]))
    transfer = med["serial"] - med["prefill"]
    return dict(variant="real-model", tokens=tokens, dtype=dtype, reps=len(by["prefill"]),
                prefill_ms=med["prefill"], streamed_ms=med["streamed"], serial_ms=med["serial"],
                ratio=med["streamed"] / med["prefill"], paired_ratio=paired,
                kv_after_token_ms=statistics.median(lag) * 1e3,
                exposed_ms=statistics.median(max(0.0, x) for x in lag) * 1e3,
                cpu_ratio=statistics.median(cpu["streamed"]) / statistics.median(cpu["prefill"]),
                hidden=(med["serial"] - med["streamed"]) / transfer if transfer > 0 else None,
                runs_ms={k: [round(x * 1e3, 1) for x in v] for k, v in by.items()}, ok=ok)


def table(o: dict) -> list[str]:
    hidden = "n/a (transfer within noise)" if o["hidden"] is None else f"{100 * o['hidden']:.0f} %"
    return [f"TTFT with the real model ({o['tokens']}-token prompt, {o['dtype']}, PrefillWorker + layer hook, "
            f"medians of {o['reps']} interleaved reps)",
            f"  prefill alone, no transfer                    {o['prefill_ms']:9.1f} ms",
            f"  prefill streaming KV layer by layer           {o['streamed_ms']:9.1f} ms   ratio {o['ratio']:.3f} "
            f"(median of per-round ratios {o['paired_ratio']:.3f})",
            f"  prefill, then the whole transfer              {o['serial_ms']:9.1f} ms",
            f"  last page in place minus first token          {o['kv_after_token_ms']:9.1f} ms (streamed; "
            f"exposed transfer {o['exposed_ms']:.1f} ms)",
            f"  prefill process CPU time, streamed / alone    {o['cpu_ratio']:9.3f}",
            f"  share of the transfer hidden behind compute   {hidden}   ok={o['ok']}"]
