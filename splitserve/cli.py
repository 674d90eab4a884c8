"""`splitserve` command line: serve | generate | bench | chaos | drain.

Each subcommand lives in its own module and is imported only when used, so `splitserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from splitserve import __version__


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options every command that builds an engine shares."""
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: the packaged SmolLM2-135M)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = the faster of float32/bfloat16 on this device")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per worker")
    p.add_argument("--layer-parallel", default=None, metavar="START:END",
                   help="evaluate layer pairs in [START, END) in parallel (arXiv 2502.02790)")
    p.add_argument("--max-model-len", type=int, default=0, help="context limit (default: the model's)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache memory per worker, GiB")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"splitserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from splitserve import cmd_bench, cmd_chaos, cmd_drain, cmd_generate, cmd_serve
    from splitserve.cluster import preemption_watch

    for command in (cmd_serve, cmd_generate, cmd_bench, cmd_drain, cmd_chaos, preemption_watch):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)    # imports every subcommand: Ctrl-C may land here
    except KeyboardInterrupt:
        return 130
    try:
        return args.run(args) or 0
    except ValueError as e:            # bad input: one clear line, no traceback
        print(f"splitserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
