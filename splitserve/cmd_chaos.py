"""`splitserve chaos`: load a live cluster while SIGKILLing or draining its workers, then check that no request
was lost, duplicated or changed, that KV blocks, Ray resources and processes are back to baseline, and report
the recovery stalls. The logic is in `bench/chaos_run.py` (importable as `splitserve.bench.chaos_run`).

    splitserve chaos --duration 120 --kill-every 30 --mode mixed             # launches `serve` itself
    splitserve chaos --url http://host:8000 --grpc host:50051 --mode drain --json

The recovery-stall figures in docs/benchmarks.md (512-token contexts: 480-token prompts, 64 new tokens):

    splitserve chaos --mode kill --victims decode --duration 280 --kill-every 13 --prompt-tokens 480 --max-tokens 64 \
        --concurrency 6 --compare 24 --launch "--prefill-workers 1 --decode-workers 4 --dtype float32 --kv-cache-gb 0.25 \
        --cpus-per-worker 0.5"
    splitserve chaos --mode drain --replace ...   (the same otherwise)
"""

from __future__ import annotations

import argparse
import signal
import sys

MODES = ("kill", "drain", "mixed")
VICTIMS = ("any", "decode", "prefill")
REFERENCES = ("replay", "local")
DEFAULT_LAUNCH = "--prefill-workers 1 --decode-workers 2 --dtype float32"


def register(sub) -> None:
    p = sub.add_parser("chaos", help="faults under load (SIGKILL / drain workers), then check the invariants")
    add_arguments(p)
    p.set_defaults(run=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    p.add_argument("--kill-every", type=float, default=30.0, help="seconds between faults (default 30)")
    p.add_argument("--mode", choices=MODES, default="mixed", help="kill: SIGKILL; drain: POST /admin/drain; "
                                                                  "mixed: alternate, starting with a kill")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="a running server's HTTP address (http://host:8000)")
    where.add_argument("--launch", default=DEFAULT_LAUNCH, metavar="ARGS",
                       help=f"launch `splitserve serve ARGS` and stop it afterwards (default: {DEFAULT_LAUNCH!r})")
    p.add_argument("--grpc", default=None, help="with --url: its gRPC host:port (default: the URL's host, :50051)")
    p.add_argument("--concurrency", type=int, default=4, help="client streams at a time (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=448, help="prompt length in tokens (default 448)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--victims", choices=VICTIMS, default="any", help="which workers faults may hit (default any)")
    p.add_argument("--drain-deadline", type=float, default=30.0, help="deadline_s of each drain (default 30)")
    p.add_argument("--seed", type=int, default=0, help="prompts, sampling seeds and victims (default 0)")
    p.add_argument("--reference", choices=REFERENCES, default="replay",
                   help="fault-free outputs: replay on the same server afterwards, or a local engine")
    p.add_argument("--dtype", default="float32", help="the local reference engine's dtype (default float32)")
    p.add_argument("--compare", type=int, default=0, metavar="N",
                   help="compare at most N of the requests in flight around a fault with the reference, those that "
                        "saw the most faults first (default 0: all; a long run's replay takes as long as its load)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--idle-timeout", type=float, default=120.0, help="wait this long for the cluster to be idle")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $SPLITSERVE_API_KEY)")
    p.add_argument("--ray-address", default=None, help="with --url: the cluster's GCS host:port (Ray checks)")
    p.add_argument("--replace", action="store_true",
                   help="after each fault add a fresh worker of the victim's role (POST /admin/workers) and remove "
                        "a drained victim (DELETE), as an autoscaler would; keeps the pool size for long runs")
    p.add_argument("--replace-delay", type=float, default=3.0,
                   help="with --replace: seconds between a fault and its replacement joining (default 3; a new "
                        "node takes longer to boot, and on one machine its model load would take CPU from the "
                        "streams that are resuming)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat on fresh launched servers and pool the figures (killed workers are not replaced)")
    p.add_argument("--log-dir", default=None, help="where the launched server's log goes (default: temp dir)")


def config_from(args: argparse.Namespace):
    from splitserve.bench.chaos_run import ChaosConfig
    from splitserve.settings import settings

    return ChaosConfig(duration_s=args.duration, kill_every_s=args.kill_every, mode=args.mode, url=args.url,
                       grpc=args.grpc, launch=args.launch, concurrency=args.concurrency,
                       prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, victims=args.victims,
                       drain_deadline_s=args.drain_deadline, seed=args.seed, reference=args.reference,
                       dtype=args.dtype, request_timeout_s=args.request_timeout, idle_timeout_s=args.idle_timeout,
                       api_key=args.api_key or settings.api_key, ray_address=args.ray_address, log_dir=args.log_dir,
                       replace=args.replace, replace_delay_s=args.replace_delay, rounds=args.rounds,
                       compare=args.compare)


def run(args: argparse.Namespace) -> int:
    from splitserve.bench.chaos_run import run_chaos, to_json

    cfg = config_from(args)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so a launched server is stopped, not left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run_chaos(cfg, progress=lambda msg: print(f"splitserve chaos: {msg}", file=sys.stderr, flush=True))
    print(to_json(report) if args.json else render(report), flush=True)
    return 0 if report["ok"] else 1


def render(report: dict) -> str:
    """The human-readable report."""
    rounds = f" in {len(report['rounds'])} rounds" if "rounds" in report else ""
    lines = [f"splitserve chaos: {'PASS' if report['ok'] else 'FAIL'} -- {report['requests']['total']} requests"
             f"{rounds}, {report['requests']['tokens']} tokens, model {report['server']['model']}"]
    lines.append("faults:")
    for f in report["faults"]:
        extra = f.get("skipped") or (
            f"held {f['held']}, stall max {f.get('stall_max_s')} s"
            + (f", migrated {f['migrated']}, recomputed {f['recomputed']} in {f['drain_seconds']} s"
               if f["kind"] == "drain" else "")
            + (f", re-prefilled {f['reprefill_tokens']} tokens" if f.get("reprefill_tokens") is not None else "")
            + (f", replaced by {f['replaced_by']}" if f.get("replaced_by") else "")
            + (f"; error: {f['error']}" if f.get("error") else ""))
        where = f"r{f['round']} " if "round" in f else ""
        lines.append(f"  {where}t={f['at_s']:>6.1f}s {f['kind']:<5} {f['worker_id'] or '-':<4} ({f['role'] or '-'}): "
                     f"{extra}")
    s = report["stalls"]
    lines.append("recovery stall (longest gap between chunks around a fault, over the requests the victim held):")
    for kind in ("kill", "drain"):
        k = s[kind]
        reprefill = k.get("reprefill_tokens")
        lines.append(f"  {kind:<5}: {k['faults']} faults, {k['affected']} requests, p50 {k['p50_s']} s, "
                     f"p99 {k['p99_s']} s, max {k['max_s']} s, re-prefilled tokens "
                     f"{'n/a' if reprefill is None else reprefill}")
    lines.append(f"  steady inter-chunk gap: p50 {s['steady_itl']['p50_s']} s, p99 {s['steady_itl']['p99_s']} s")
    lines.append("invariants:")
    for name, v in report["invariants"].items():
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[v["ok"]]
        lines.append(f"  {mark} {name}: {v['detail']}")
    for r in report["suspect_requests"]:
        lines.append(f"  suspect {r['request_id']} (#{r['index']}): sent t={r['sent_s']}s, {r['chunks']} chunks "
                     f"({r['tokens']} tokens), last chunk t={r['last_chunk_s']}s, done t={r['done_s']}s, "
                     f"{r['error'] or r['finish_reason']}; faults during: {', '.join(r['faults_during']) or 'none'}")
    if report["server"].get("log_tail"):
        lines.append(f"server log ({report['server']['log']}), last lines:")
        lines += ["  " + line for line in report["server"]["log_tail"].splitlines()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m splitserve.cmd_chaos ...`: the same command without going through `splitserve`."""
    parser = argparse.ArgumentParser(prog="splitserve chaos", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"splitserve chaos: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
