"""Ray's node drain as a preemption notice.

Ray 2.60 keeps a draining-node table in the GCS: `GcsClient.get_draining_nodes()` -> {node id hex: deadline in
epoch ms, 0 = none}. A node enters it through `ray drain-node` (hidden CLI), the autoscaler's idle or preemption
termination, or KubeRay. It is observable from any process that can reach the GCS, with no `ray.init`:

    RayDrainSource       one node (this host's, or --node-id): a `PreemptionWatcher` source, for the per-node
                         `splitserve watch-preemption --cloud ray`
    RayDrainWatcher      every node, inside the router process: calls on_drain(node_id, deadline_s) once per node
                         that starts draining, so the router drains the workers on it (they match the node id)

An idle node is drained (and dies) at once, so the table shows a node only while something still runs on it:
exactly the nodes that have workers to move. The API is Ray-internal (`ray._raylet.GcsClient`), which is why
every call to it is in this file.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .preemption import DEFAULT_DEADLINE_S, MetadataError, Notice, deadline_until

log = logging.getLogger(__name__)

GCS_TIMEOUT_S = 5


def gcs_draining_nodes(gcs_address: str | None = None) -> dict[str, int]:
    """{node id hex: drain deadline epoch ms (0: none)} from the GCS at `gcs_address` (default: this driver's)."""
    import ray

    if gcs_address is None:
        if not ray.is_initialized():
            raise MetadataError("no Ray GCS address given and this process is not connected to Ray")
        gcs_address = ray.get_runtime_context().gcs_address
    return dict(ray._raylet.GcsClient(address=gcs_address).get_draining_nodes(timeout=GCS_TIMEOUT_S))


def local_node_id(gcs_address: str | None = None) -> str:
    """The id of the live Ray node on this host (its node manager address is one of this host's addresses)."""
    import ray
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    address = gcs_address or ray.get_runtime_context().gcs_address
    mine = {ray.util.get_node_ip_address(), "127.0.0.1"}
    nodes = ray._raylet.GcsClient(address=address).get_all_node_info(timeout=GCS_TIMEOUT_S)
    alive = [nid.hex() for nid, info in nodes.items()
             if info.state == GcsNodeInfo.ALIVE and info.node_manager_address in mine]
    if len(alive) != 1:
        raise MetadataError(f"cannot tell this host's Ray node ({len(alive)} live nodes at {sorted(mine)}); "
                            "pass --node-id")
    return alive[0]


def _deadline_s(deadline_ms: int, now: float) -> float:
    return DEFAULT_DEADLINE_S if not deadline_ms else deadline_until(deadline_ms / 1000.0, now)


class RayDrainSource:
    """A `NoticeSource`: is Ray draining `node_id`?"""

    name = "ray"

    def __init__(self, node_id: str | None = None, gcs_address: str | None = None,
                 draining_nodes: Callable[[], dict[str, int]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.node_id, self.gcs_address, self.clock = node_id, gcs_address, clock
        self._draining_nodes = draining_nodes or (lambda: gcs_draining_nodes(self.gcs_address))

    def check(self, wait_s: float) -> Notice | None:
        if self.node_id is None:
            self.node_id = local_node_id(self.gcs_address)
        nodes = self._draining_nodes()
        if self.node_id not in nodes:
            return None
        ms = nodes[self.node_id]
        return Notice(self.name, _deadline_s(ms, self.clock()),
                      f"Ray is draining node {self.node_id[:12]} (deadline {'none' if not ms else ms})")


class RayDrainWatcher(threading.Thread):
    """Router side: polls the draining-node table and calls `on_drain(node_id, deadline_s)` once for each node
    that enters it. Errors are logged and polling goes on; `stop()` ends it."""

    def __init__(self, on_drain: Callable[[str, float], None], poll_interval_s: float = 1.0,
                 draining_nodes: Callable[[], dict[str, int]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(name="ray-drain-watcher", daemon=True)
        self.on_drain, self.poll_interval_s, self.clock = on_drain, poll_interval_s, clock
        self._draining_nodes = draining_nodes or gcs_draining_nodes
        self.seen: set[str] = set()
        self._stopping = threading.Event()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        failures = 0
        while not self._stopping.wait(self.poll_interval_s):
            try:
                nodes = self._draining_nodes()
            except Exception as e:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("Ray drain watcher: cannot read the draining nodes (%d failures): %s", failures, e)
                continue
            failures = 0
            for node_id, ms in nodes.items():
                if node_id in self.seen:
                    continue
                self.seen.add(node_id)
                deadline = _deadline_s(ms, self.clock())
                log.warning("Ray is draining node %s; draining its workers within %.1f s", node_id, deadline)
                try:
                    self.on_drain(node_id, deadline)
                except Exception:
                    log.exception("Ray drain watcher: draining node %s failed", node_id)
