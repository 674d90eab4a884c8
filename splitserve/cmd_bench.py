"""`splitserve bench engine|prefill|kv|serve|layer-parallel`: benchmarks that print ratios against a peer
measured in the same run. Each harness lives in `bench/` (importable as `splitserve.bench`) and takes its own
options."""

from __future__ import annotations

import argparse
import importlib

HARNESSES = {
    "engine": ("splitserve.bench.engine_bench", "decode throughput vs HF transformers and the GEMM roofline"),
    "prefill": ("splitserve.bench.prefill_bench", "prompt processing time vs HF transformers' forward"),
    "kv": ("splitserve.bench.kv_bench", "KV streaming vs raw torch.distributed send/recv; TTFT with streaming"),
    "serve": ("splitserve.bench.serve_bench", "online serving: TTFT/TPOT/goodput against any OpenAI URL"),
    "layer-parallel": ("splitserve.bench.layer_parallel_bench", "layer-pair parallelism: quality vs speed-up"),
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (engine, prefill, kv, serve, layer-parallel)")
    p.add_argument("harness", choices=sorted(HARNESSES), help="; ".join(f"{k}: {v[1]}" for k, v in HARNESSES.items()))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the harness's own options (see `splitserve bench NAME -h`)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    module_name = HARNESSES[args.harness][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ValueError(f"the {args.harness} benchmark is not available in this build ({module_name})") from None
        raise
    return module.main(args.rest) or 0
