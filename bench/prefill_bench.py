"""`splitserve bench prefill`: time to process one prompt (prefill) in the engine against HF transformers.

For each dtype and prompt length N, one fresh random prompt of N token ids at a time (no prefix-cache hits):

    engine   LLMEngine with the whole prompt as one chunk (max_num_batched_tokens = N), max_tokens=1: the
             scheduler, the forward over the paged KV cache (every layer's K and V stored) and the first token
    hf       AutoModelForCausalLM(input_ids) on the engine's converted weights, same dtype (sdpa attention),
             logits of the last position only (`logits_to_keep=1`), no cache kept

Each system runs in its own subprocess on `--threads` torch threads (default 1: one dedicated core, robust to
other processes on the machine); the figure is the best of `--reps` prompts, in milliseconds of CPU time of that
process (`--clock wall` for wall-clock) and prompt tokens per second.

With `--beside-decodes B --chunks C,...` the engine also computes each prompt in chunks of C tokens beside B
running decodes (`max_prefill_tokens_with_decodes` = C: what a colocated worker, or a decode worker that takes a
prompt itself, does). Per chunk size it reports the decode-only step, the step with a chunk (each decode's
inter-token latency while the prompt is computed), and the prompt's cost there: its steps times their excess over
a decode-only step. Its peer is the same prompt computed alone as one chunk (the engine figure above): a ratio
above 1 means the chunks cost less riding along with the decodes than the prompt costs alone.

    splitserve bench prefill --tokens 128,512,2048 --dtypes float32,bfloat16 [--json]
    splitserve bench prefill --tokens 512 --dtypes bfloat16 --beside-decodes 8 --chunks 16,64,256
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path


def _clock(kind: str) -> float:
    return time.process_time() if kind == "cpu" else time.perf_counter()


def _prompts(n: int, reps: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(n)] for _ in range(reps + 1)]    # +1: the warm-up


def engine_worker(dtype: str, tokens: list[int], reps: int, clock: str) -> dict:
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(dtype=dtype, max_num_batched_tokens=max(tokens), verbose=False))
    vocab, out = engine.model_config.vocab_size, {}
    for n in tokens:
        best = float("inf")
        for i, ids in enumerate(_prompts(n, reps, vocab, seed=n)):
            engine.add_request(f"prefill-{n}-{i}", ids, SamplingParams(max_tokens=1, temperature=0.0))
            start = _clock(clock)
            while engine.has_unfinished:
                engine.step()
            if i:
                best = min(best, _clock(clock) - start)
        out[n] = best
    return out


def hf_worker(dtype: str, tokens: list[int], reps: int, clock: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.loader.resolve import prepare_model

    hf_logging.set_verbosity_error()
    model_dir = prepare_model(None, EngineConfig().cache_dir, verbose=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa").eval()
    out = {}
    with torch.inference_mode():
        for n in tokens:
            best = float("inf")
            for i, ids in enumerate(_prompts(n, reps, model.config.vocab_size, seed=n)):
                start = _clock(clock)
                model(torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits.argmax(-1)
                if i:
                    best = min(best, _clock(clock) - start)
            out[n] = best
    return out


def beside_worker(dtype: str, tokens: list[int], reps: int, clock: str, batch: int, chunks: list[int]) -> dict:
    """Per chunk size and prompt length: median decode-only step, median step with a chunk (seconds), steps."""
    import statistics

    from splitserve.bench.engine_bench import _prompts as decode_prompts
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    out: dict = {}
    for chunk in chunks:
        engine = LLMEngine(EngineConfig(dtype=dtype, max_num_batched_tokens=max(max(tokens), 1024),
                                        max_num_seqs=batch + 1, max_prefill_tokens_with_decodes=chunk,
                                        verbose=False))
        vocab = engine.model_config.vocab_size
        for i, ids in enumerate(decode_prompts(engine.tokenizer, batch)):    # decodes that outlast the prompts
            engine.add_request(f"decode-{i}", ids, SamplingParams(max_tokens=engine.runner.max_model_len - len(ids),
                                                                  ignore_eos=True))

        def step() -> tuple[float, set[str]]:
            start = _clock(clock)
            outs = engine.step()
            return _clock(clock) - start, {o.request_id for o in outs if o.finished}

        for _ in range(3):
            step()
        for n in tokens:
            decode_only, mixed, steps = [], [], 0
            for i, ids in enumerate(_prompts(n, reps, vocab, seed=n)):
                rid = f"prompt-{chunk}-{n}-{i}"
                engine.add_request(rid, ids, SamplingParams(max_tokens=1, temperature=0.0))
                times, finished = [], set()
                while rid not in finished:
                    took, finished = step()
                    times.append(took)
                decode_only += [step()[0] for _ in range(4)]
                if i:                                     # the first prompt warms up the shapes
                    mixed += times
                    steps = len(times)
            out[f"{chunk}:{n}"] = {"decode_s": statistics.median(decode_only),
                                   "mixed_s": statistics.median(mixed), "steps": steps}
    return out


WORKERS = {"engine": engine_worker, "hf": hf_worker, "beside": beside_worker}


def _spawn(kind: str, dtype: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--dtypes", dtype,
           "--tokens", ",".join(map(str, args.tokens)), "--reps", str(args.reps), "--threads", str(args.threads),
           "--clock", args.clock, "--beside-decodes", str(args.beside_decodes),
           "--chunks", ",".join(map(str, args.chunks))]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} prefill benchmark ({dtype}) failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result if kind == "beside" else {int(k): v for k, v in result.items()}


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def table(rows: list[dict], clock: str) -> str:
    unit = "CPU ms" if clock == "cpu" else "ms"
    return _markdown(
        ["dtype", "prompt tokens", f"engine {unit}", f"HF {unit}", "engine tok/s", "HF tok/s", "engine/HF speed"],
        [[r["dtype"], str(r["tokens"]), f"{r['engine_s'] * 1e3:.0f}", f"{r['hf_s'] * 1e3:.0f}",
          f"{r['tokens'] / r['engine_s']:.0f}", f"{r['tokens'] / r['hf_s']:.0f}", f"{r['hf_s'] / r['engine_s']:.2f}x"]
         for r in rows])


def beside_table(rows: list[dict], clock: str, batch: int) -> str:
    unit = "CPU ms" if clock == "cpu" else "ms"
    return _markdown(
        ["dtype", "prompt tokens", "chunk", f"step with {batch} decodes ({unit})", f"step with a chunk too ({unit})",
         "steps", f"prompt's cost beside decodes ({unit})", f"prompt alone ({unit})", "alone / beside"],
        [[r["dtype"], str(r["tokens"]), str(r["chunk"]), f"{r['decode_s'] * 1e3:.1f}", f"{r['mixed_s'] * 1e3:.1f}",
          str(r["steps"]), f"{r['beside_s'] * 1e3:.0f}", f"{r['engine_s'] * 1e3:.0f}",
          f"{r['engine_s'] / r['beside_s']:.2f}x"] for r in rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve bench prefill", description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]              # noqa: E731
    p.add_argument("--tokens", type=ints, default=[128, 512, 2048], help="prompt lengths, e.g. 128,512,2048")
    p.add_argument("--dtypes", type=lambda s: [x for x in s.split(",") if x], default=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=3, help="prompts per point after a warm-up; the best is kept")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each measured process")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--beside-decodes", type=int, default=0, metavar="B",
                   help="also time each prompt in chunks beside B running decodes (engine only)")
    p.add_argument("--chunks", type=ints, default=[16, 64, 256],
                   help="with --beside-decodes: prompt tokens per step beside the decodes, e.g. 16,64,256")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    if not args.tokens or any(n <= 0 for n in args.tokens):
        raise ValueError(f"--tokens must be positive integers, got {args.tokens}")
    if bad := [d for d in args.dtypes if d not in ("float32", "bfloat16", "float16")]:
        raise ValueError(f"--dtypes must be float32, bfloat16 or float16; got {','.join(bad)}")
    if args.reps <= 0 or args.threads <= 0:
        raise ValueError(f"--reps and --threads must be positive, got {args.reps} and {args.threads}")
    if args.beside_decodes < 0 or not args.chunks or any(c <= 0 for c in args.chunks):
        raise ValueError(f"--beside-decodes must be >= 0 and --chunks positive integers, got {args.beside_decodes} "
                         f"and {args.chunks}")
    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        extra = (args.beside_decodes, args.chunks) if args.worker == "beside" else ()
        print(json.dumps(WORKERS[args.worker](args.dtypes[0], args.tokens, args.reps, args.clock, *extra)))
        return 0
    rows, beside = [], []
    for dtype in args.dtypes:
        print(f"[{dtype}] prefill of {','.join(map(str, args.tokens))} tokens: engine, HF transformers ...",
              file=sys.stderr, flush=True)
        eng, hf = _spawn("engine", dtype, args), _spawn("hf", dtype, args)
        rows += [{"dtype": dtype, "tokens": n, "engine_s": eng[n], "hf_s": hf[n]} for n in args.tokens]
        if args.beside_decodes:
            print(f"[{dtype}] the same prompts in chunks of {','.join(map(str, args.chunks))} beside "
                  f"{args.beside_decodes} decodes ...", file=sys.stderr, flush=True)
            got = _spawn("beside", dtype, args)
            for chunk in args.chunks:
                for n in args.tokens:
                    r = got[f"{chunk}:{n}"]
                    beside.append({"dtype": dtype, "tokens": n, "chunk": chunk, **r, "engine_s": eng[n],
                                   "beside_s": r["steps"] * (r["mixed_s"] - r["decode_s"])})
    report = {"benchmark": "prefill", "clock": args.clock, "threads": args.threads, "rows": rows}
    if args.beside_decodes:
        report.update(beside_decodes=args.beside_decodes, beside=beside)
    if args.json:
        print(json.dumps(report))
    else:
        print(table(rows, args.clock))
        if beside:
            print()
            print(beside_table(beside, args.clock, args.beside_decodes))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except ValueError as e:
        print(f"splitserve bench prefill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
