"""`splitserve bench serve`: online-serving benchmark against any OpenAI-compatible URL, in the style of
`vllm bench serve`: a random synthetic workload, Poisson arrivals at a set rate (or a sweep of rates) under an
optional concurrency cap; TTFT, TPOT, ITL, E2E latency, throughput and goodput (see serve_report.py).

    for each target (--base-url, or each --launch "LABEL:SERVE ARGS", started here on free ports):
        start the server (launch only) -> warm-up requests -> for each rate: run_load, summarize, print
        -> stop the server (launch only)
    then one table of every (target, rate), optionally --json and a --plot of goodput and p99 TPOT vs rate,
    and with --tpot-slo-grid the goodput and sustained rate of every target per TPOT target (serve_report.py)

Every target sees the same prompts. Every rate replays the same arrival gaps (scaled to it) and lengths with
words of its own, and the warm-up others again, so no run is served from the prefix cache of an earlier one.
--from-json PATH re-reports saved --json outputs without running anything. Examples:

    splitserve bench serve --base-url http://127.0.0.1:8000/v1 --num-prompts 50 --request-rate 1
    splitserve bench serve --input-len 512 --input-len-range 0.25 --output-len 32 --output-len-range 0.25 \
        --sweep-rates 0.1,0.2,0.4 --ttft-slo-ms 3000 --tpot-slo-ms 150 --plot docs/img/serve_sweep.png \
        --launch "disaggregated:--prefill-workers 1 --decode-workers 1" \
        --launch "colocated:--colocated --decode-workers 2"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from splitserve.ports import free_port

from .serve_load import Progress, WorkloadConfig, WordTokens, default_tokenizer_dir, make_dataset, run_load
from .serve_report import (attainment_at, capacity_table, format_run, goodput_at, markdown_table, plot, slo_grid_table,
                           summarize)


@dataclass(slots=True)
class LaunchSpec:
    """`LABEL:ARGS` for `splitserve serve` (ARGS alone: the label is ARGS)."""
    label: str
    args: list[str]

    @classmethod
    def parse(cls, text: str) -> "LaunchSpec":
        label, sep, rest = text.partition(":")
        if not sep or not label.strip() or label.lstrip().startswith("-") or " " in label.strip():
            label, rest = text.strip() or "default", text
        return cls(label=label.strip(), args=shlex.split(rest))


class ServerProcess:
    """`splitserve serve ARGS` as a subprocess on free ports (its own session), healthy before start() returns;
    stop() sends SIGINT (drain) and kills the session only if that does not end it."""

    def __init__(self, spec: LaunchSpec, log_dir: Path, start_timeout: float = 300.0) -> None:
        self.spec, self.start_timeout = spec, start_timeout
        self.http_port, self.grpc_port = free_port(), free_port()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in spec.label)
        self.log_path = Path(log_dir) / f"splitserve-bench-{safe}-{self.http_port}.log"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "splitserve.cli", "serve", "--host", "127.0.0.1", "--http-port",
               str(self.http_port), "--grpc-port", str(self.grpc_port), *self.spec.args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`{shlex.join(cmd)}` exited with {self.proc.returncode}; log {self.log_path}:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"`{shlex.join(cmd)}` not healthy after {self.start_timeout:.0f}s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 120.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@dataclass(slots=True)
class Target:
    label: str
    base_url: str
    server: ServerProcess | None = None
    runs: list[dict] = field(default_factory=list)
    problem: str = ""


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sweep-rates must be comma-separated numbers (or inf), got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--sweep-rates must be positive rates, got {text!r}")
    return rates


def discover_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    data = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30).json()
    return data["data"][0]["id"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


WARMUP_SEED_OFFSET = 10_000


def bench_target(target: Target, args, workload: WorkloadConfig, words: WordTokens, rates: list[float]) -> None:
    model = args.model or discover_model(target.base_url, args.api_key)
    common = dict(endpoint=workload.endpoint, max_concurrency=args.max_concurrency, ignore_eos=not args.no_ignore_eos,
                  api_key=args.api_key, timeout=args.request_timeout)
    if args.warmup:
        _log(f"{target.label}: {args.warmup} warm-up request(s) ...")
        warmup = replace(workload, num_prompts=args.warmup, seed=workload.seed + WARMUP_SEED_OFFSET)
        warm, _ = asyncio.run(run_load(target.base_url, model, make_dataset(warmup, words),
                                       **{**common, "max_concurrency": 1}))
        if not any(r.ok for r in warm):
            raise RuntimeError(f"every warm-up request failed: {warm[0].error}")
    before = placement_counts(target.base_url, args.api_key)
    for i, rate in enumerate(rates):
        # the same lengths and the same arrival pattern at every rate (only its time scale changes), words of
        # its own: rates differ in load alone, and no rate hits the prefix cache of another
        specs = make_dataset(workload, words, prompt_seed=i)
        load = os.getloadavg()[0]
        label = f"{target.label} @ {rate:g} req/s"
        _log(f"{label}: {len(specs)} requests (load average {load:.2f} on {os.cpu_count()} cores) ...")
        results, duration = asyncio.run(run_load(
            target.base_url, model, specs, request_rate=rate, seed=workload.seed, **common,
            progress=Progress(label, len(specs), enabled=not args.quiet)))
        summary = summarize(results, duration, args.ttft_slo_ms, args.tpot_slo_ms)
        placed = placement_counts(target.base_url, args.api_key)
        summary["placements"] = {k: n - before.get(k, 0) for k, n in placed.items() if n > before.get(k, 0)}
        before = placed
        target.runs.append({"label": target.label, "rate": rate, "max_concurrency": args.max_concurrency,
                            "model": model, "loadavg_1m_before": load, "summary": summary})
        text = format_run(summary) + (f"\nplacements: {summary['placements']}" if summary["placements"] else "")
        print(f"\n== {label} ==\n{text}\n", file=sys.stderr if args.json else sys.stdout, flush=True)
        if target.server and not target.server.alive():
            raise RuntimeError(f"the server exited with {target.server.proc.returncode} during the run")


def placement_counts(base_url: str, api_key: str | None) -> dict[str, float]:
    """splitserve's placement decisions so far, by reason, from the server's /metrics; {} for other servers."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        r = httpx.get(root + "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=10)
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in r.text.splitlines() if r.status_code == 200 else []:
        if line.startswith("splitserve_placement_decisions_total{") and 'reason="' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _clean(x):
    """JSON without Infinity/NaN: inf -> "inf", NaN -> null."""
    if isinstance(x, float):
        return None if math.isnan(x) else ("inf" if math.isinf(x) else x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve bench serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the OpenAI API root (ends in /v1)")
    p.add_argument("--model", default=None, help="model id to request (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer dir for the prompts (default: splitserve's model)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson rate, req/s (inf: all at once)")
    p.add_argument("--sweep-rates", default=None, help="comma-separated rates, run in turn (overrides --request-rate)")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--input-len-range", type=float, default=0.0, help="lengths uniform in MEAN*(1 +- FRAC)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--output-len-range", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="goodput: TTFT target")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="goodput: TPOT target")
    p.add_argument("--tpot-slo-grid", default=None, metavar="MS,MS,...",
                   help="also tabulate goodput for these TPOT targets, at the rate where --baseline breaks each")
    p.add_argument("--baseline", default=None, help="the --launch label the SLO grid compares against")
    p.add_argument("--no-ignore-eos", action="store_true", help="send neither ignore_eos nor min_tokens")
    p.add_argument("--warmup", type=int, default=2, help="requests sent one by one before measuring (not counted)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--launch", action="append", default=[], metavar="LABEL:SERVE_ARGS",
                   help="start `splitserve serve SERVE_ARGS` on free ports, benchmark it, stop it (repeatable)")
    p.add_argument("--launch-timeout", type=float, default=300.0, help="seconds for a launched server to get healthy")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp"), help="where launched servers' logs go")
    p.add_argument("--plot", type=Path, default=None, help="PNG of goodput and p99 TPOT against rate")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--from-json", action="append", default=[], type=Path, metavar="PATH",
                   help="report earlier --json outputs (repeatable, merged) instead of running anything")
    return p


def _grid(args, labels: list[str]) -> list[float]:
    """--tpot-slo-grid as numbers, checked against --baseline before anything is launched."""
    if args.tpot_slo_grid is None:
        return []
    try:
        grid = [float(x) for x in args.tpot_slo_grid.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--tpot-slo-grid must be comma-separated milliseconds, got {args.tpot_slo_grid!r}") from None
    if not grid or any(x <= 0 for x in grid):
        raise ValueError(f"--tpot-slo-grid needs positive milliseconds, got {args.tpot_slo_grid!r}")
    if args.baseline not in labels:
        raise ValueError(f"--tpot-slo-grid needs --baseline, one of the configs: {', '.join(labels)}")
    return grid


def report_saved(args) -> int:
    """--from-json: the tables, SLO grid and plot of earlier `--json` outputs (merged; a later file's point
    replaces an earlier one at the same config and rate), measuring nothing."""
    points: dict = {}
    for path in args.from_json:
        try:
            saved = json.loads(Path(path).read_text())
            runs, w = saved["runs"], saved["workload"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"--from-json {path}: not a `splitserve bench serve --json` output ({e})") from None
        for r in runs:
            if "requests" not in r["summary"]:
                raise ValueError(f"--from-json {path}: saved without per-request records (before they were kept); "
                                 "run the sweep again to re-report it")
            r["rate"] = float(r["rate"])                     # "inf" was written as a string
            points[(r["label"], r["rate"])] = r
    order = list(dict.fromkeys(label for label, _ in points))
    runs = sorted(points.values(), key=lambda r: (order.index(r["label"]), r["rate"]))
    grid = _grid(args, list(dict.fromkeys(r["label"] for r in runs)))
    if args.ttft_slo_ms is not None or args.tpot_slo_ms is not None:     # goodput for these targets instead
        for s in (r["summary"] for r in runs):
            s.update(goodput=goodput_at(s, args.ttft_slo_ms, args.tpot_slo_ms),
                     slo_attainment=attainment_at(s, args.ttft_slo_ms, args.tpot_slo_ms),
                     ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms)
    if args.plot:
        slo = ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in (("ttft", args.ttft_slo_ms), ("tpot", args.tpot_slo_ms))
                        if v is not None)
        plot(runs, args.plot, title=f"input {w['input_len']} ±{w['input_len_range']:.0%}, output {w['output_len']} "
                                    f"±{w['output_len_range']:.0%}, {w['num_prompts']} requests per point, seed "
                                    f"{w['seed']}; {slo}")
        _log(f"plot: {args.plot}")
    print(markdown_table(runs))
    if grid:
        print(_grid_tables(runs, args, grid))
    return 0


def _grid_tables(runs: list[dict], args, grid: list[float]) -> str:
    return ("\n" + slo_grid_table(runs, args.ttft_slo_ms, grid, args.baseline) + "\n\n"
            + capacity_table(runs, args.ttft_slo_ms, grid, args.baseline))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        return report_saved(args)
    rates = parse_rates(args.sweep_rates) if args.sweep_rates else [args.request_rate]
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    workload = WorkloadConfig(num_prompts=args.num_prompts, input_len=args.input_len,
                              input_len_range=args.input_len_range, output_len=args.output_len,
                              output_len_range=args.output_len_range, endpoint=args.endpoint, seed=args.seed)
    words = WordTokens(args.tokenizer or default_tokenizer_dir())
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    launches = [LaunchSpec.parse(t) for t in args.launch]
    grid = _grid(args, [s.label for s in launches] or [args.base_url])
    targets = [Target(s.label, "", ServerProcess(s, args.log_dir, args.launch_timeout)) for s in launches] or [
        Target(args.base_url, args.base_url)]

    for target in targets:
        try:
            if target.server:
                _log(f"{target.label}: starting `splitserve serve {shlex.join(target.server.spec.args)}` "
                     f"(log {target.server.log_path}) ...")
                target.server.start()
                target.base_url = target.server.url + "/v1"
            bench_target(target, args, workload, words, rates)
        except (RuntimeError, TimeoutError, httpx.HTTPError, KeyError, ValueError) as e:
            tail = target.server.log_tail() if target.server else ""
            target.problem = f"{type(e).__name__}: {e}"
            _log(f"{target.label}: FAILED: {target.problem}" + (f"\n--- server log tail ---\n{tail}" if tail else ""))
        finally:
            if target.server:
                code = target.server.stop()
                _log(f"{target.label}: server stopped (exit code {code}); log {target.server.log_path}")

    runs = [r for t in targets for r in t.runs]
    if args.plot and runs:
        slo = f"TTFT <= {args.ttft_slo_ms:g} ms, TPOT <= {args.tpot_slo_ms:g} ms" if (
            args.ttft_slo_ms is not None and args.tpot_slo_ms is not None) else ""
        plot(runs, args.plot, title=f"input {args.input_len} ±{args.input_len_range:.0%}, output {args.output_len} "
                                    f"±{args.output_len_range:.0%}, {args.num_prompts} requests per point; {slo}")
        _log(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(_clean({
            "workload": asdict(workload), "rates": rates, "ttft_slo_ms": args.ttft_slo_ms,
            "tpot_slo_ms": args.tpot_slo_ms, "runs": runs,
            "targets": [{"label": t.label, "base_url": t.base_url, "problem": t.problem or None,
                         **({"serve_args": t.server.spec.args, "log": str(t.server.log_path),
                             "returncode": t.server.proc.returncode if t.server.proc else None,
                             "log_tail": t.server.log_tail() if t.problem else None} if t.server else {})}
                        for t in targets]}), indent=2))
    elif runs:
        print(markdown_table(runs))
    if grid and runs:
        print(_grid_tables(runs, args, grid), file=sys.stderr if args.json else sys.stdout)
    return 1 if any(t.problem for t in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
