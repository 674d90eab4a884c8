"""Acting on preemption notices.

`splitserve watch-preemption --cloud aws|gcp|azure|ray --router URL`: a small process per node that waits for
the cloud's preemption notice and then drains the node through the router, with the same HTTP call as
`splitserve drain $(hostname) --deadline D` (D from the notice). It exits once the router has answered (0) or the
deadline has passed without a router to answer (1); run it under a supervisor that restarts it.

`start_router_watchers(router, loop, cloud)`: the same inside `splitserve serve`, plus Ray's node drain.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import time

from .preemption import CLOUDS, PreemptionWatcher

log = logging.getLogger("splitserve.watch_preemption")


def register(sub) -> None:
    p = sub.add_parser("watch-preemption", help="drain this node through the router when the cloud preempts it")
    p.add_argument("--cloud", required=True, choices=CLOUDS)
    p.add_argument("--router", default="http://127.0.0.1:8000", help="the router's HTTP address")
    p.add_argument("--target", default=None,
                   help="what to drain (default: this host's name; with --cloud ray: this host's Ray node id)")
    p.add_argument("--metadata-url", default=None, help="the metadata service's base URL (default: the cloud's)")
    p.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls (default 2)")
    p.add_argument("--ray-address", default=None, help="--cloud ray: the GCS address (host:port)")
    p.add_argument("--node-id", default=None, help="--cloud ray: the Ray node to watch (default: this host's)")
    p.add_argument("--api-key", default=None, help="the router's API key (default: $SPLITSERVE_API_KEY)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.poll_interval > 0:
        raise ValueError(f"--poll-interval must be positive, got {args.poll_interval}")
    options = {"gcs_address": args.ray_address, "node_id": args.node_id} if args.cloud == "ray" else {}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return watch(args.cloud, args.router, target=args.target, metadata_url=args.metadata_url,
                 poll_interval_s=args.poll_interval, api_key=args.api_key, stop=stop, **options)


def watch(cloud: str, router: str, *, target: str | None = None, metadata_url: str | None = None,
          poll_interval_s: float = 2.0, api_key: str | None = None, stop: threading.Event | None = None,
          **options) -> int:
    """Block until a notice has been handled (0: the router drained the target; 1: it could not) or `stop`."""
    stop = stop or threading.Event()
    result: list[int] = []

    def on_notice(deadline_s: float) -> None:
        node = target or (watcher.source.node_id if cloud == "ray" else socket.gethostname())
        result.append(drain_through_router(router, node, deadline_s, api_key))
        stop.set()

    watcher = PreemptionWatcher(cloud, metadata_url, poll_interval_s, on_notice, **options)
    log.info("watching %s for a preemption notice (every %.1f s); the router is %s", cloud, poll_interval_s, router)
    watcher.start()
    while not stop.wait(0.5):
        if not watcher.is_alive():          # it only ends after on_notice has run, so result is set
            break
    watcher.stop(timeout=1)
    return result[0] if result else 0


def drain_through_router(router: str, target: str, deadline_s: float, api_key: str | None = None) -> int:
    """`splitserve drain TARGET --deadline D --router URL`, retried while the router is unreachable and time is
    left (a router restarting, a network blip): 0 when the router answered 200, else 1."""
    from splitserve import cmd_drain

    end = time.monotonic() + deadline_s
    args = argparse.Namespace(target=target, deadline=round(max(1.0, deadline_s), 3), router=router, api_key=api_key)
    while True:
        try:
            return cmd_drain.run(args)
        except ValueError as e:             # cmd_drain: the router cannot be reached
            if time.monotonic() + 1.0 >= end:
                log.error("giving up on draining %s: %s", target, e)
                return 1
            log.warning("%s; retrying", e)
            time.sleep(1.0)
            args.deadline = round(max(1.0, end - time.monotonic()), 3)


def start_router_watchers(router, loop, cloud: str = "none", *, metadata_url: str | None = None,
                          poll_interval_s: float = 2.0, ray_drain: bool = True,
                          draining_nodes=None) -> list:
    """Inside `splitserve serve` (cluster mode): drain through `router.drain` on the router's event loop `loop`
      - every Ray node that starts draining (`ray drain-node`, the autoscaler, KubeRay): the workers on it;
      - with `cloud` (aws|gcp|azure): this host's preemption notice: the workers on this host.
    Returns the started watcher threads (call `.stop()` on each at shutdown)."""
    import asyncio

    def drain(target: str, deadline_s: float) -> None:
        future = asyncio.run_coroutine_threadsafe(router.drain(target, deadline_s), loop)
        try:
            log.warning("drained %s: %s", target, future.result(deadline_s + 30))
        except LookupError:               # nothing of ours runs there
            log.info("no splitserve worker on %s to drain", target)

    watchers = []
    if ray_drain:
        from .preemption_ray import RayDrainWatcher

        watchers.append(RayDrainWatcher(drain, poll_interval_s=1.0, draining_nodes=draining_nodes))
    if cloud != "none":
        host = socket.gethostname()
        watchers.append(PreemptionWatcher(cloud, metadata_url, poll_interval_s, lambda d: drain(host, d)))
    for w in watchers:
        w.start()
    return watchers
