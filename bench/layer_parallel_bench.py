"""`splitserve bench layer-parallel`: what layer-pair parallelism (arXiv 2502.02790) costs in quality and buys in
decode speed, on the packaged SmolLM2, for a sweep of layer ranges [START, END) evaluated in pairs.

    quality   teacher-forced at TP=1 on a real English text that ships with the machine (the GPL-3 text in
              /usr/share/common-licenses; CPython's own pydoc topics where that is missing), in windows of
              --window tokens: perplexity and its increase over the sequential model, top-1 agreement with the
              sequential model's next-token argmax, mean KL(sequential || pairs) per position
    speed     decode throughput (--batch requests, --max-tokens new tokens each, ignore_eos) relative to the
              sequential model, at TP=1 and at TP=2 (Gloo, one process per rank): the range's engine and a
              sequential engine that stays loaded take decode steps in turn, --rounds generations each, and the
              rate is batch / median step time, so load from other processes on the machine hits both alike
    all-reduce  the latency of one Gloo all-reduce of a decode step's activations between two processes: a TP=2
              step makes 2 per layer (2 per pair of layers with pairs), which bounds what pairs can save

    splitserve bench layer-parallel [--ranges 24:26,20:28,0:30] [--threads 1] [--json] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SECTION = "## Layer-pair parallelism (splitserve bench layer-parallel)"
BEGIN, END = "<!-- layer-parallel-bench:begin -->", "<!-- layer-parallel-bench:end -->"
DEFAULT_RANGES = "16:18,25:27,26:28,24:28,22:28,20:28,16:28,10:20,4:28,0:30"
GPL3 = Path("/usr/share/common-licenses/GPL-3")
PROMPT = "The history of the printing press begins"
TARGET_SPEEDUP, TARGET_PPL = 1.15, 0.05


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_text() -> tuple[str, str]:
    if GPL3.exists():
        return GPL3.read_text(), str(GPL3)
    import pydoc_data.topics as topics        # part of CPython's standard library

    return "\n\n".join(topics.topics.values()), f"{topics.__file__} (CPython pydoc topics)"


def parse_ranges(text: str) -> list[tuple[int, int]]:
    from splitserve.engine.config import parse_layer_range

    ranges = [parse_layer_range(r) for r in text.split(",") if r]
    if not ranges or any(r is None for r in ranges):
        raise ValueError(f"--ranges must be comma-separated non-empty START:END ranges, got {text!r}")
    return ranges


def _label(layer_range) -> str:
    return "sequential" if layer_range is None else f"{layer_range[0]}:{layer_range[1]}"


# ---- quality ---------------------------------------------------------------------------------------------------
def quality(args, ranges, ids: list[int]) -> dict:
    """Per range: perplexity, top-1 agreement and mean KL against the sequential model (TP=1)."""
    import torch

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.layer_parallel import layer_parallel_transform
    from splitserve.engine.loader.resolve import prepare_model
    from splitserve.engine.model_runner import ModelRunner
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.engine.scheduler import ScheduledBatch
    from splitserve.engine.sequence import Sequence

    windows = [ids[i:i + args.window] for i in range(0, len(ids) - 1, args.window) if len(ids[i:i + args.window]) > 1]
    blocks = -(-args.window // 16)

    def logprobs(runner, window):
        seq = Sequence("quality", window, SamplingParams(max_tokens=1))
        seq.block_table = list(range(blocks))
        return torch.log_softmax(runner.logits(ScheduledBatch([seq], [len(window)])), dim=-1)

    def runner_for(layer_range):
        config = EngineConfig(dtype=args.dtype, num_kv_blocks=blocks, layer_parallel=layer_range, verbose=False)
        return ModelRunner(config, prepare_model(None, config.cache_dir, verbose=False),
                           model_transform=layer_parallel_transform(layer_range))

    seq_runner = runner_for(None)
    reference = [logprobs(seq_runner, w) for w in windows]
    del seq_runner
    out = {}
    for layer_range in [None] + ranges:
        runner = runner_for(layer_range) if layer_range else None
        nll = top1 = kl = n = 0.0
        for w, ref in zip(windows, reference):
            lp = logprobs(runner, w) if runner else ref
            targets = torch.tensor(w[1:])
            nll += -lp[:-1].gather(1, targets[:, None]).sum().item()
            top1 += (lp.argmax(-1) == ref.argmax(-1)).sum().item()
            kl += (ref.exp() * (ref - lp)).sum(-1).sum().item()
            n += len(w)
        predicted = sum(len(w) - 1 for w in windows)
        out[_label(layer_range)] = {"ppl": float(torch.tensor(nll / predicted).exp()), "top1": top1 / n,
                                    "kl": kl / n}
        _log(f"  quality {_label(layer_range):>10s}: ppl {out[_label(layer_range)]['ppl']:.3f}  "
             f"top-1 {top1 / n:.3f}  KL {kl / n:.4f}")
        del runner
    return {"windows": len(windows), "tokens": sum(map(len, windows)), "by_range": out}


# ---- speed -----------------------------------------------------------------------------------------------------
def decode_step_times(engines: list, batch: int, max_tokens: int) -> list[list[float]]:
    """Seconds per decode step of each engine, stepping the engines in turn (one step each, round-robin), so load
    from other processes on the machine hits every engine alike. A step counts once all of that engine's
    requests have their first token (prefill excluded)."""
    from splitserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    started: list[set] = [set() for _ in engines]
    times: list[list[float]] = [[] for _ in engines]
    for k, engine in enumerate(engines):
        for i in range(batch):
            engine.add_request(f"lp-{k}-{i}-{time.monotonic_ns()}", engine.encode_prompt(PROMPT), params)
    while any(e.has_unfinished for e in engines):
        for k, engine in enumerate(engines):
            if not engine.has_unfinished:
                continue
            decoding = len(started[k]) == batch
            t0 = time.perf_counter()
            outs = engine.step()
            if decoding:
                times[k].append(time.perf_counter() - t0)
            started[k].update(o.request_id for o in outs)
    return times


def speed(args, ranges, tp: int) -> dict:
    """Decode tok/s of each range against the sequential model, from the median of interleaved step times."""
    import statistics

    import torch

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.layer_parallel import layer_parallel_transform
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.tp_engine import TPEngine

    threads = args.threads or max(1, (os.cpu_count() or 1) // tp)
    blocks = 2 * args.batch * (-(-(args.max_tokens + 16) // 16) + 1)

    def build(layer_range):
        config = EngineConfig(dtype=args.dtype, num_kv_blocks=blocks, max_num_seqs=args.batch, tp=tp,
                              layer_parallel=layer_range, verbose=False)
        if tp > 1:
            return TPEngine(config, threads_per_rank=threads)
        torch.set_num_threads(threads)
        return LLMEngine(config, model_transform=layer_parallel_transform(layer_range))

    sequential = build(None)
    out = {}
    for layer_range in ranges:
        candidate = build(layer_range)
        decode_step_times([sequential, candidate], args.batch, 4)          # warm-up
        seq_times, times = [], []
        for _ in range(args.rounds):
            a, b = decode_step_times([sequential, candidate], args.batch, args.max_tokens)
            seq_times += a
            times += b
        if tp > 1:
            candidate.close()
        del candidate
        seq_rate, rate = args.batch / statistics.median(seq_times), args.batch / statistics.median(times)
        out[_label(layer_range)] = {"tok_s": rate, "sequential_tok_s": seq_rate, "speedup": rate / seq_rate,
                                    "steps": len(times)}
        _log(f"  speed TP={tp} {_label(layer_range):>10s}: {rate:6.1f} tok/s vs sequential {seq_rate:6.1f} "
             f"-> {rate / seq_rate:.3f}x  ({len(times)} steps each)")
    if tp > 1:
        sequential.close()
    return {"threads_per_rank": threads, "by_range": out}


# ---- all-reduce latency between two processes --------------------------------------------------------------------
def allreduce_latency(args, iters: int = 2000) -> float:
    """Microseconds per all-reduce of a [batch, hidden] float32 activation: best of 5 rounds of `iters`."""
    from splitserve.engine import dist as tp_dist

    store = tp_dist.host_store()
    peer = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--allreduce-peer",
                             f"127.0.0.1:{store.port}", "--batch", str(args.batch), "--dtype", args.dtype],
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        group = tp_dist.new_group(store, 0, 2, "cpu", 60.0, "tp/allreduce-bench")
        best = _allreduce_rounds(group, args.batch, args.dtype, iters)
    finally:
        peer.wait(timeout=120)
    return best


def _allreduce_rounds(group, batch: int, dtype: str, iters: int) -> float:
    import torch

    from splitserve.engine import dist as tp_dist

    x = torch.randn(batch, 576, dtype=torch.float32)       # RowParallelLinear reduces in float32
    best = float("inf")
    for _ in range(5):
        tp_dist.all_reduce(x, group)
        start = time.perf_counter()
        for _ in range(iters):
            tp_dist.all_reduce(x, group)
        best = min(best, (time.perf_counter() - start) / iters * 1e6)
    return best


def _allreduce_peer(addr: str, batch: int, dtype: str) -> int:
    from splitserve.engine import dist as tp_dist

    _allreduce_rounds(tp_dist.join_group(addr, 1, 2, "cpu", 60.0, "tp/allreduce-bench"), batch, dtype, 2000)
    return 0


# ---- the report ------------------------------------------------------------------------------------------------
def collect(args) -> dict:
    import torch

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.tokenizer import Tokenizer
    from splitserve.engine.loader.resolve import prepare_model

    ranges = parse_ranges(args.ranges)
    text, source = load_text()
    ids = Tokenizer(prepare_model(None, EngineConfig().cache_dir, verbose=False)).encode(text)[:args.eval_tokens]
    load_before = os.getloadavg()[0]
    _log(f"[quality] {len(ids)} tokens of {source}, windows of {args.window}, {args.dtype}")
    q = quality(args, ranges, ids)
    speeds, ar_us = {}, None
    if not args.skip_speed:
        _log(f"[all-reduce] Gloo, 2 processes, [{args.batch}, 576] float32")
        ar_us = allreduce_latency(args)
        _log(f"  {ar_us:.1f} us per all-reduce")
    for tp in [] if args.skip_speed else args.tp:
        _log(f"[speed] TP={tp}: batch {args.batch}, {args.max_tokens} new tokens x {args.rounds} rounds")
        speeds[tp] = speed(args, ranges, tp)
    base_ppl = q["by_range"]["sequential"]["ppl"]
    rows = []
    for r in ranges:
        label, qr = _label(r), q["by_range"][_label(r)]
        row = {"range": label, "pairs": (r[1] - r[0]) // 2, "ppl": qr["ppl"], "ppl_increase": qr["ppl"] / base_ppl - 1,
               "top1": qr["top1"], "kl": qr["kl"]}
        for tp, s in speeds.items():
            row[f"speedup_tp{tp}"] = s["by_range"][label]["speedup"]
            row[f"tok_s_tp{tp}"] = s["by_range"][label]["tok_s"]
            row[f"sequential_tok_s_tp{tp}"] = s["by_range"][label]["sequential_tok_s"]
        rows.append(row)
    return {"benchmark": "layer-parallel", "model": "SmolLM2-135M (30 layers)", "text": source,
            "eval_tokens": q["tokens"], "window": args.window, "dtype": args.dtype, "batch": args.batch,
            "max_tokens": args.max_tokens, "rounds": args.rounds, "tp": list(speeds),
            "threads_per_rank": {tp: s["threads_per_rank"] for tp, s in speeds.items()}, "cpus": os.cpu_count(),
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)], "torch": torch.__version__,
            "sequential_ppl": base_ppl, "allreduce_us": ar_us, "rows": rows, "verdict": verdict(rows, list(speeds))}


def verdict(rows: list[dict], tps: list[int]) -> dict:
    """The fastest range at the highest TP measured among those under the perplexity budget."""
    ok = [r for r in rows if r["ppl_increase"] < TARGET_PPL]
    if not tps:
        return {"tp": None, "best_range_under_5pct_ppl": ok[0]["range"] if ok else None, "best_speedup": None,
                "met": None}
    tp = max(tps)
    best = max(ok, key=lambda r: r[f"speedup_tp{tp}"], default=None)
    return {"tp": tp, "best_range_under_5pct_ppl": best and best["range"],
            "best_speedup": best and best[f"speedup_tp{tp}"],
            "met": bool(best and best[f"speedup_tp{tp}"] >= TARGET_SPEEDUP)}


def table(report: dict) -> str:
    tps = report["tp"]
    head = ["range", "pairs", "perplexity", "ppl increase", "top-1 agree", "mean KL"]
    head += [f"speed-up TP={tp} (tok/s: pairs / sequential)" for tp in tps]
    rows = [["sequential", "0", f"{report['sequential_ppl']:.3f}", "-", "1.000", "0"] + ["1x" for _ in tps]]
    for r in report["rows"]:
        rows.append([r["range"], str(r["pairs"]), f"{r['ppl']:.3f}", f"{r['ppl_increase']:+.1%}", f"{r['top1']:.3f}",
                     f"{r['kl']:.4f}"] + [f"{r[f'speedup_tp{tp}']:.3f}x ({r[f'tok_s_tp{tp}']:.1f} / "
                                           f"{r[f'sequential_tok_s_tp{tp}']:.1f})" for tp in tps])
    lines = ["| " + " | ".join(row) + " |" for row in [head, ["---"] * len(head)] + rows]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tp, marker in zip(report["tp"], "os^"):
        xs = [r[f"speedup_tp{tp}"] for r in report["rows"]]
        ys = [100 * r["ppl_increase"] for r in report["rows"]]
        ax.scatter(xs, ys, marker=marker, label=f"TP={tp}")
        for r, x, y in zip(report["rows"], xs, ys):
            ax.annotate(r["range"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(TARGET_SPEEDUP, color="grey", ls="--", lw=0.8)
    ax.axhline(100 * TARGET_PPL, color="grey", ls="--", lw=0.8)
    ax.fill_between([TARGET_SPEEDUP, ax.get_xlim()[1]], -1, 100 * TARGET_PPL, color="green", alpha=0.08,
                    label="target (>=1.15x, <5% ppl)")
    ax.set(yscale="symlog", xlabel="decode throughput vs sequential (same TP)", ylabel="perplexity increase, %",
           title=f"SmolLM2-135M layer pairs: quality vs speed-up ({report['dtype']}, batch {report['batch']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(report: dict, out: Path, command: str) -> None:
    """Replace this benchmark's generated block in `out` (creating the section if needed), keeping the rest."""
    img = out.parent / "img" / "layer_parallel.png"
    plot(report, img)
    v = report["verdict"]
    block = "\n".join([
        BEGIN, f"Command: `{command}`  ",
        f"torch {report['torch']}, {report['dtype']}, {report['cpus']} CPUs, torch threads per rank "
        f"{', '.join(f'TP={tp}: {n}' for tp, n in report['threads_per_rank'].items())}, 1-minute load average {report['load_avg_1m'][0]} before and "
        f"{report['load_avg_1m'][1]} after (other processes share these cores). Quality: {report['eval_tokens']} "
        f"tokens of `{report['text']}` in windows of {report['window']}, TP=1. Speed: batch {report['batch']}, "
        f"{report['max_tokens']} new tokens x {report['rounds']} rounds, decode steps interleaved with the sequential "
        f"model's, batch / median step time. One Gloo all-reduce of a [{report['batch']}, 576] activation between two processes: "
        f"{report['allreduce_us']:.0f} us.", "",
        table(report), "",
        f"Target (>= {TARGET_SPEEDUP}x at TP={v['tp']} for < 5% perplexity): **{'met' if v['met'] else 'not met'}**"
        f" — best range under 5%: {v['best_range_under_5pct_ppl'] or 'none'}"
        + (f" at {v['best_speedup']:.3f}x." if v["best_speedup"] else "."), "",
        f"![layer-parallel quality vs speed-up]({img.relative_to(out.parent).as_posix()})", END])
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


# ---- entry points ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve bench layer-parallel", description=__doc__.splitlines()[0])
    p.add_argument("--ranges", default=DEFAULT_RANGES, help="comma-separated START:END layer ranges")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens of the text to score")
    p.add_argument("--window", type=int, default=256, help="teacher-forced window length")
    p.add_argument("--batch", type=int, default=1, help="concurrent requests while decoding")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=4, help="generations per engine (their decode steps are pooled)")
    p.add_argument("--tp", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2],
                   help="tensor-parallel degrees to measure speed at")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: CPUs / tp)")
    p.add_argument("--skip-speed", action="store_true", help="quality only (e.g. to scan many ranges)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", type=Path, default=None, help="update this markdown file's section")
    p.add_argument("--allreduce-peer", default=None, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    if args.allreduce_peer:
        return _allreduce_peer(args.allreduce_peer, args.batch, args.dtype)
    for name in ("eval_tokens", "window", "batch", "max_tokens", "rounds"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.window < 2 or args.eval_tokens < 2:
        raise ValueError("--window and --eval-tokens must be at least 2")
    if not args.tp or any(t <= 0 for t in args.tp):
        raise ValueError(f"--tp must be positive integers, got {args.tp}")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.skip_speed and args.out:
        raise ValueError("--out writes the speed columns too; drop --skip-speed")
    parse_ranges(args.ranges)
    report = collect(args)
    print(json.dumps(report) if args.json else table(report))
    if args.out:
        command = (f"splitserve bench layer-parallel --ranges {args.ranges} --dtype {args.dtype} --batch {args.batch}"
                   f" --max-tokens {args.max_tokens} --rounds {args.rounds} --tp {','.join(map(str, args.tp))}"
                   + (f" --threads {args.threads}" if args.threads else "") + f" --out {args.out}")
        write_markdown(report, args.out, command)
        _log(f"wrote {args.out} and {args.out.parent / 'img' / 'layer_parallel.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
