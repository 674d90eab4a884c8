"""`splitserve bench engine`: the engine's decode throughput against HF transformers and the GEMM roofline.

For each dtype and concurrency B, three numbers in generated tokens per second:

    engine    B requests (short real prompts, ignore_eos, exactly --max-tokens new tokens each) run together
    hf        HF `generate` on the same weights, dtype and prompts (left-padded batch, min_new_tokens=max)
    roofline  B / (time of one decode step's weight matmuls alone): every weight matrix of the model (fused
              qkv, o, fused gate_up, down per layer, then lm_head) at batch B, through the fastest matmul this
              machine has for the dtype: F.linear, or oneDNN on weights reordered once (PackedLinear, bfloat16
              with AMX), whichever is faster at that B

"Decode" throughput counts the tokens produced after every request of the batch has its first token (prefill
done) over the time since then, so all three measure the same thing; the end-to-end rate (prefill included)
is reported too. Each (system, dtype) runs in its own subprocess, so peak RSS is that system's alone and one
system's allocations never slow another's.

    python bench/engine_bench.py --concurrency 1,8,32,128 --max-tokens 128 --dtypes float32,bfloat16 \
        [--skip-hf] [--json] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SECTION = "## Engine decode throughput (splitserve bench engine)"
BEGIN, END = "<!-- engine-bench:begin -->", "<!-- engine-bench:end -->"

# Short real prompts of varied length; every other one gets the chat template (~30 extra tokens): 4-43 tokens.
PROMPTS = [
    "What is the capital of France?", "The quick brown fox", "Write a haiku about the sea.",
    "Explain why the sky is blue in two sentences.", "Once upon a time, in a small village by the river,",
    "List three uses of a paperclip.", "def fibonacci(n):", "Translate 'good morning' into Spanish and German.",
    "The history of the printing press begins", "What should I pack for a weekend hiking trip in autumn?",
    "Dear hiring manager, I am writing to apply for", "Summarize the plot of Romeo and Juliet.",
    "In physics, entropy is", "Give me a recipe for pancakes.", "The best way to learn a new language is",
    "Why do cats purr?",
]


# ---- workers: each runs in its own process and prints one JSON line ---------------------------------------
class PeakRss:
    """The largest resident set size seen while the block runs (sampled every 20 ms from /proc/self/statm).

    Not the process high-water mark: loading float32 safetensors touches more memory than serving does."""

    def __enter__(self) -> "PeakRss":
        self.peak, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prompts(tokenizer, batch: int) -> list[list[int]]:
    """`batch` prompts cycling through PROMPTS, tokenized as `LLMEngine.encode_prompt` does."""
    def encode(i: int) -> list[int]:
        text = PROMPTS[i % len(PROMPTS)]
        return tokenizer.apply_chat_template([{"role": "user", "content": text}]) if i % 2 == 0 else \
            tokenizer.encode(text)
    return [encode(i) for i in range(batch)]


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _rates(batch: int, max_tokens: int, start: tuple, first_all: tuple, end: tuple, decoded: int,
           rss: PeakRss) -> dict:
    """decode rate = tokens after every request's first one / time since; e2e = all tokens / all time.
    cpu_tok_s divides by the process's CPU seconds instead: less sensitive to other processes on the cores."""
    return {"tok_s": decoded / max(end[0] - first_all[0], 1e-9), "e2e_tok_s": batch * max_tokens / (end[0] - start[0]),
            "cpu_tok_s": decoded / max(end[1] - first_all[1], 1e-9),
            "cpu_e2e_tok_s": batch * max_tokens / (end[1] - start[1]), "seconds": end[0] - start[0],
            "peak_rss_mib": rss.peak}


def _best_of(repeats: int, run) -> dict:
    """Each rate's best over `repeats` runs (other processes on the cores only ever slow a run down)."""
    runs = [run() for _ in range(repeats)]
    return {key: (min if key == "seconds" else max)(r[key] for r in runs) for key in runs[0]}


def engine_worker(dtype: str, batches: list[int], max_tokens: int, repeats: int = 1) -> dict:
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.loader.resolve import prepare_model
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.engine.tokenizer import Tokenizer

    # a KV cache that holds the largest batch exactly (no preemption, no more memory than needed): the engine
    # preallocates it, so it is part of the RSS reported at every concurrency
    config = EngineConfig(dtype=dtype, max_num_seqs=max(batches), verbose=False)
    tokenizer = Tokenizer(prepare_model(None, config.cache_dir, verbose=False))
    config.num_kv_blocks = sum(-(-(len(p) + max_tokens) // config.block_size) + 1
                               for p in _prompts(tokenizer, max(batches)))
    engine = LLMEngine(config)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def run(batch: int, params: SamplingParams) -> dict:
        prompts = _prompts(engine.tokenizer, batch)
        for i, p in enumerate(prompts):
            engine.add_request(f"bench-{batch}-{i}", p, params)
        first_all, started, decoded = None, set(), 0
        with PeakRss() as rss:
            start = _now()
            while engine.has_unfinished:
                outs = engine.step()
                if first_all is not None:
                    decoded += sum(len(o.new_token_ids) for o in outs)
                started.update(o.request_id for o in outs)
                if first_all is None and len(started) == batch:
                    first_all = _now()
            end = _now()
        return _rates(batch, params.max_tokens, start, first_all, end, decoded, rss)

    results = {}
    for b in batches:
        run(b, SamplingParams(max_tokens=4, ignore_eos=True))    # warm-up: oneDNN primitives for these shapes
        results[b] = _best_of(repeats, lambda: run(b, params))
        _log(f"  engine   {dtype:8s} B={b:<4d} {results[b]['tok_s']:8.1f} tok/s")
    return {"results": results, "torch_dtype": str(engine.runner.dtype).removeprefix("torch.")}


def hf_worker(dtype: str, batches: list[int], max_tokens: int, repeats: int = 1) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
    from transformers.utils import logging as hf_logging

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.loader.resolve import prepare_model
    from splitserve.engine.tokenizer import Tokenizer

    hf_logging.set_verbosity_error()
    model_dir = prepare_model(None, EngineConfig().cache_dir, verbose=False)   # the engine's converted weights
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
    tok = Tokenizer(model_dir)

    class Clock(LogitsProcessor):
        """Called once per generated token position: after prefill, then after each decode step."""
        def __init__(self) -> None:
            self.times: list[tuple[float, float]] = []

        def __call__(self, input_ids, scores):
            self.times.append(_now())
            return scores

    def run(batch: int, new_tokens: int) -> dict:
        prompts = _prompts(tok, batch)
        width = max(map(len, prompts))
        pad = tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = Clock()
        with PeakRss() as rss, torch.inference_mode():
            start = _now()
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([clock]))
            end = _now()
        return _rates(batch, new_tokens, start, clock.times[0], end, batch * (len(clock.times) - 1), rss)

    results = {}
    for b in batches:
        run(b, 4)
        results[b] = _best_of(repeats, lambda: run(b, max_tokens))
        _log(f"  hf       {dtype:8s} B={b:<4d} {results[b]['tok_s']:8.1f} tok/s")
    return {"results": results}


def roofline_worker(dtype: str, batches: list[int], max_tokens: int, repeats: int = 1) -> dict:
    import torch
    import torch.nn.functional as F

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.loader.resolve import prepare_model
    from splitserve.engine.model_config import ModelConfig
    from splitserve.engine.models.layers import PackedLinear, can_pack_linears

    cfg = ModelConfig.from_dir(prepare_model(None, EngineConfig().cache_dir, verbose=False))
    dt = getattr(torch, dtype)
    h, qkv = cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    per_layer = [(qkv, h), (h, cfg.num_attention_heads * cfg.head_dim), (2 * cfg.intermediate_size, h),
                 (h, cfg.intermediate_size)]
    # distinct tensors per layer, as in the model: the weights stream from memory, not from cache
    shapes = per_layer * cfg.num_hidden_layers + [(cfg.vocab_size, h)]
    weights = [torch.randn(shape, dtype=dt) * 0.02 for shape in shapes]
    matmuls = {"F.linear": [(functools.partial(F.linear, weight=w), w.shape[1]) for w in weights]}
    if can_pack_linears(torch.device("cpu"), dt):    # what the engine itself runs for bfloat16
        packed = [(PackedLinear(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dt)), w.shape[1])
                  for w in weights]
        matmuls["oneDNN packed"] = packed
    results = {}
    with torch.inference_mode():
        for b in batches:
            xs = {k: torch.randn(b, k, dtype=dt) for k in {s[1] for s in shapes}}
            best = None
            for name, ops in matmuls.items():

                def step() -> None:
                    for op, k in ops:
                        op(xs[k])

                for _ in range(3):
                    step()
                wall = cpu = float("inf")
                for _ in range(3 * repeats):           # best of rounds of >= 0.3 s each: a bound
                    n, t0, c0 = 0, time.perf_counter(), time.process_time()
                    while (elapsed := time.perf_counter() - t0) < 0.3 or n < 3:
                        step()
                        n += 1
                    wall, cpu = min(wall, elapsed / n), min(cpu, (time.process_time() - c0) / n)
                if best is None or wall < best["step_ms"] / 1e3:
                    best = {"tok_s": b / wall, "cpu_tok_s": b / cpu, "step_ms": wall * 1e3, "matmul": name}
            results[b] = best
            _log(f"  roofline {dtype:8s} B={b:<4d} {best['tok_s']:8.1f} tok/s ({best['matmul']})")
    return {"results": results}


WORKERS = {"engine": engine_worker, "hf": hf_worker, "roofline": roofline_worker}


def _spawn(kind: str, dtype: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--dtypes", dtype, "--concurrency",
           ",".join(map(str, args.concurrency)), "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)      # stderr (progress) passes through
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} benchmark ({dtype}) failed with exit code {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["results"] = {int(k): v for k, v in out["results"].items()}
    return out


# ---- the report ---------------------------------------------------------------------------------------------
def collect(args: argparse.Namespace) -> dict:
    import torch

    from splitserve.engine.config import resolve_dtype

    batches, rows, load_before = args.concurrency, [], os.getloadavg()[0]
    for dtype in args.dtypes:
        _log(f"[{dtype}] GEMM roofline, engine{'' if args.skip_hf else ', HF transformers'} "
             f"at concurrency {','.join(map(str, batches))}, {args.max_tokens} new tokens")
        roof = _spawn("roofline", dtype, args)["results"]
        eng = _spawn("engine", dtype, args)["results"]
        hf = {} if args.skip_hf else _spawn("hf", dtype, args)["results"]
        key, e2e = ("cpu_tok_s", "cpu_e2e_tok_s") if args.clock == "cpu" else ("tok_s", "e2e_tok_s")
        for b in batches:
            e, h, r = eng[b], hf.get(b), roof[b]
            rows.append({
                "dtype": dtype, "concurrency": b, "engine_tok_s": e[key], "hf_tok_s": h and h[key],
                "roofline_tok_s": r[key], "engine_vs_hf": h and e[key] / h[key],
                "engine_vs_roofline": e[key] / r[key], "engine_e2e_tok_s": e[e2e],
                "hf_e2e_tok_s": h and h[e2e], "engine_wall_tok_s": e["tok_s"],
                "engine_cpu_tok_s": e["cpu_tok_s"], "hf_wall_tok_s": h and h["tok_s"],
                "hf_cpu_tok_s": h and h["cpu_tok_s"], "engine_peak_rss_mib": e["peak_rss_mib"],
                "hf_peak_rss_mib": h and h["peak_rss_mib"]})
    fastest = {b: max((r for r in rows if r["concurrency"] == b), key=lambda r: r["engine_tok_s"])["dtype"]
               for b in batches}
    return {"benchmark": "engine", "max_tokens": args.max_tokens, "clock": args.clock,
            "threads": args.threads or torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "torch": torch.__version__, "auto_dtype": resolve_dtype("auto", "cpu"), "fastest_dtype": fastest,
            "rows": rows}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(report: dict) -> str:
    lines = ["| dtype | B | engine tok/s | HF tok/s | roofline tok/s | engine/HF | engine/roofline "
             "| engine e2e tok/s | engine RSS MiB | HF RSS MiB |", "|" + "---|" * 10]
    for r in report["rows"]:
        lines.append(f"| {r['dtype']} | {r['concurrency']} | {r['engine_tok_s']:.1f} | {_fmt(r['hf_tok_s'], '.1f')} "
                     f"| {r['roofline_tok_s']:.1f} | {_fmt(r['engine_vs_hf'], '.2f')}x "
                     f"| {r['engine_vs_roofline']:.0%} | {r['engine_e2e_tok_s']:.1f} "
                     f"| {r['engine_peak_rss_mib']:.0f} | {_fmt(r['hf_peak_rss_mib'], '.0f')} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in report["rows"]))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = [r for r in report["rows"] if r["dtype"] == dtype]
        xs = [r["concurrency"] for r in rows]
        lines = (("roofline_tok_s", "GEMM roofline", "k--"), ("engine_tok_s", "splitserve engine", "o-"),
                 ("hf_tok_s", "HF transformers generate", "s-"))
        for key, label, style in lines:
            if all(r[key] is not None for r in rows):
                ax.plot(xs, [r[key] for r in rows], style, label=label)
        per = "CPU second (1 process)" if report["clock"] == "cpu" else "second"
        ax.set(xscale="log", yscale="log", xlabel="concurrency (requests)", ylabel=f"decode tokens per {per}",
               title=f"{dtype}, {report['max_tokens']} new tokens, {report['threads']} thread(s)")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(report: dict, out: Path, command: str) -> None:
    """Replace the generated block of this benchmark's section in `out`, keeping everything else."""
    img = out.parent / "img" / "engine_throughput.png"
    plot(report, img)
    load, fastest = report["load_avg_1m"], ", ".join(f"{b}: {d}" for b, d in report["fastest_dtype"].items())
    block = "\n".join([
        BEGIN, f"Command: `{command}`  ",
        f"torch {report['torch']}, {report['threads']} threads on {report['cpus']} CPUs (1-minute load average "
        f"{load[0]} before, {load[1]} after). `dtype=auto` resolves to **{report['auto_dtype']}** here; the "
        f"faster engine dtype per concurrency: {fastest}. Rates are decode tokens per "
        f"{'CPU second of the measured process' if report['clock'] == 'cpu' else 'second (wall clock)'}.", "",
        table(report), "", f"![engine decode throughput]({img.relative_to(out.parent).as_posix()})", END])
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif SECTION in text:
        head, rest = text.split(SECTION, 1)
        text = head + SECTION + "\n\n" + block + "\n" + rest
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    out.write_text(text)


# ---- entry points -------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="splitserve bench engine", description=__doc__.splitlines()[0])
    csv_ints = lambda s: [int(x) for x in s.split(",") if x]                      # noqa: E731
    p.add_argument("--concurrency", type=csv_ints, default=[1, 8, 32, 128], help="batch sizes, e.g. 1,8,32,128")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    p.add_argument("--dtypes", type=lambda s: [x for x in s.split(",") if x], default=["float32", "bfloat16"],
                   help="comma-separated: float32, bfloat16, float16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every measured process (default: torch's, one per core)")
    p.add_argument("--skip-hf", action="store_true", help="skip the HF transformers reference")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="tokens per wall-clock second, or per CPU second of the measured process (with --threads 1: "
                        "what one dedicated core does, robust to other processes sharing the machine)")
    p.add_argument("--repeats", type=int, default=1, help="run each measurement N times and keep the best")
    p.add_argument("--out", type=Path, default=None,
                   help="update this benchmark's section of a markdown file (e.g. docs/benchmarks.md)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    if not args.concurrency or any(b <= 0 for b in args.concurrency):
        raise ValueError(f"--concurrency must be positive integers, got {args.concurrency}")
    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if bad := [d for d in args.dtypes if d not in ("float32", "bfloat16", "float16")]:
        raise ValueError(f"--dtypes must be float32, bfloat16 or float16; got {','.join(bad)}")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.repeats <= 0:
        raise ValueError(f"--repeats must be positive, got {args.repeats}")
    if args.worker:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        out = WORKERS[args.worker](args.dtypes[0], args.concurrency, args.max_tokens, args.repeats)
        print(json.dumps(out))
        return 0
    report = collect(args)
    print(json.dumps(report) if args.json else table(report))
    if args.out:
        command = "splitserve bench engine " + " ".join([
            f"--concurrency {','.join(map(str, args.concurrency))}", f"--max-tokens {args.max_tokens}",
            f"--dtypes {','.join(args.dtypes)}"] + ([f"--threads {args.threads}"] if args.threads else [])
            + ([f"--repeats {args.repeats}"] if args.repeats > 1 else [])
            + ([f"--clock {args.clock}"] if args.clock != "wall" else []) + (["--skip-hf"] if args.skip_hf else [])
            + [f"--out {args.out}"])
        write_markdown(report, args.out, command)
        _log(f"wrote {args.out} and {args.out.parent / 'img' / 'engine_throughput.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except ValueError as e:
        print(f"splitserve bench engine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
