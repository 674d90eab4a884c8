"""`splitserve drain NODE_OR_WORKER --deadline S`: move every request off a worker or node before it goes away.

Decode workers hand their running requests' live KV to other decode workers (recompute when the deadline is too
close); the target gets no new work. Prints the router's report as JSON. The preStop hook of the Helm chart
runs this with the pod's host name.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("drain", help="drain a worker or node (preemption, maintenance)")
    p.add_argument("target", help="worker id (e.g. d0), Ray node id, or the node's host name")
    p.add_argument("--deadline", type=float, default=30.0, help="seconds until the node goes away (default 30)")
    p.add_argument("--router", default="http://127.0.0.1:8000", help="the router's HTTP address")
    p.add_argument("--api-key", default=None, help="the router's API key (default: $SPLITSERVE_API_KEY)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import httpx

    from splitserve.settings import settings

    if args.deadline <= 0:
        raise ValueError(f"--deadline must be positive, got {args.deadline}")
    key = args.api_key or settings.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(args.router.rstrip("/") + "/admin/drain", json={"target": args.target,
                       "deadline_s": args.deadline}, headers=headers, timeout=args.deadline + 30)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach the router at {args.router}: {e}") from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except Exception:
            message = r.text
        print(f"splitserve drain: {r.status_code}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(r.json()))
    return 0
