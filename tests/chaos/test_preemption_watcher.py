"""Preemption watchers against a fake metadata server (AWS IMDSv2, GCP, Azure) and Ray's draining-node table:
no notice -> no call; a notice -> exactly one call with the notice's deadline; an unreachable or confused
metadata service -> logged, polled again, never a crash. And `splitserve watch-preemption`'s drain call."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from splitserve.cluster.preemption import DEFAULT_DEADLINE_S, PreemptionWatcher, make_source
from splitserve.cluster.preemption_ray import RayDrainSource, RayDrainWatcher
from splitserve.cluster.preemption_watch import start_router_watchers, watch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_metadata import AWS_ACTION, GCP_PREEMPTED, FakeMetadata, FakeRouter  # noqa: E402
from splitserve.ports import free_port  # noqa: E402

CLOUDS = ["aws", "gcp", "azure"]
POLL_S = 0.05


def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def fake():
    server = FakeMetadata()
    yield server
    server.close()


def start(cloud: str, url: str, calls: list, poll_s: float = POLL_S, **kw) -> PreemptionWatcher:
    watcher = PreemptionWatcher(cloud, url, poll_s, calls.append, request_timeout_s=1.0, **kw)
    watcher.start()
    return watcher


@pytest.mark.parametrize("cloud", CLOUDS)
def test_no_notice_no_call(fake, cloud):
    calls: list = []
    watcher = start(cloud, fake.url, calls)
    wait_until(lambda: watcher.polls >= 5)
    assert calls == [] and watcher.failures == 0 and watcher.is_alive()
    watcher.stop()
    assert not watcher.is_alive() and calls == []


@pytest.mark.parametrize("cloud", CLOUDS)
def test_notice_calls_once_with_the_notice_deadline(fake, cloud):
    calls: list = []
    watcher = start(cloud, fake.url, calls)
    wait_until(lambda: watcher.polls >= 2)
    fake.notice(in_s=120)
    wait_until(lambda: calls)
    watcher.join(2)
    assert not watcher.is_alive()                     # one notice, one call, then it is done
    time.sleep(5 * POLL_S)
    assert len(calls) == 1
    # AWS and Azure say when the node goes (second resolution); GCP's notice is always 30 s
    expected = DEFAULT_DEADLINE_S if cloud == "gcp" else 120
    assert expected - 3 <= calls[0] <= expected + 0.5, calls
    assert watcher.notice is not None and watcher.notice.cloud == cloud


@pytest.mark.parametrize("cloud", CLOUDS)
def test_unreachable_metadata_keeps_polling_logs_and_recovers(cloud, caplog):
    port = free_port()
    calls: list = []
    with caplog.at_level(logging.INFO, logger="splitserve.cluster.preemption"):
        watcher = start(cloud, f"http://127.0.0.1:{port}", calls)
        wait_until(lambda: watcher.failures >= 5)
        assert watcher.is_alive() and calls == []
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "cannot read the notice" in warnings[0].getMessage()   # once, not per poll
        server = FakeMetadata(port=port)              # the service comes (back) up: still watching
        try:
            server.notice(in_s=60)
            wait_until(lambda: calls)
            assert len(calls) == 1 and watcher.failures == 0
            assert any("reachable again" in r.getMessage() for r in caplog.records)
        finally:
            server.close()


def test_garbled_answers_are_logged_not_fatal(fake, caplog):
    # a GCP watcher pointed at the wrong path family: 404s are not a notice and not a crash
    calls: list = []
    watcher = PreemptionWatcher("gcp", fake.url + "/nowhere", POLL_S, calls.append, request_timeout_s=1.0)
    with caplog.at_level(logging.WARNING, logger="splitserve.cluster.preemption"):
        watcher.start()
        wait_until(lambda: watcher.failures >= 3)
    assert watcher.is_alive() and calls == []
    assert "HTTP 404" in caplog.text
    watcher.stop()


def test_aws_uses_an_imdsv2_token_and_renews_it(fake):
    calls: list = []
    watcher = start("aws", fake.url, calls)
    wait_until(lambda: watcher.polls >= 3)
    assert fake.hits["PUT /latest/api/token"] == 1           # one token for many polls
    fake.revoke_tokens()                                      # e.g. the instance was stopped and started
    polls = watcher.polls
    wait_until(lambda: watcher.polls >= polls + 3)
    assert fake.hits["PUT /latest/api/token"] == 2 and watcher.failures == 0
    fake.notice(in_s=90)
    wait_until(lambda: calls)
    assert 87 <= calls[0] <= 90.5


def test_aws_notice_without_time_and_azure_without_not_before_default_to_30_s(fake):
    fake.notice(in_s=500, with_time=False)
    for cloud in ("aws", "azure"):
        calls: list = []
        start(cloud, fake.url, calls)
        wait_until(lambda: calls)
        assert calls == [DEFAULT_DEADLINE_S]


def test_gcp_long_polls_so_a_notice_is_seen_at_once(fake):
    calls: list = []
    watcher = start("gcp", fake.url, calls, poll_s=30.0)      # one long poll of up to 30 s at a time
    wait_until(lambda: fake.hits["GET " + GCP_PREEMPTED] >= 2)
    time.sleep(0.2)
    seen = time.monotonic()
    fake.notice()
    wait_until(lambda: calls, timeout=5)
    assert time.monotonic() - seen < 2 and calls == [DEFAULT_DEADLINE_S]
    watcher.join(2)


def test_azure_ignores_other_vms_and_other_event_types(fake):
    soon = "Mon, 19 Sep 2016 18:29:47 GMT"
    fake.other_vm_events = [
        {"EventId": "X", "EventType": "Preempt", "Resources": ["another-vm"], "NotBefore": soon},
        {"EventId": "Y", "EventType": "Freeze", "Resources": [fake.vm_name], "NotBefore": soon}]
    calls: list = []
    watcher = start("azure", fake.url, calls)
    wait_until(lambda: watcher.polls >= 5)
    assert calls == [] and watcher.source.vm_name == fake.vm_name
    fake.notice(in_s=45)
    wait_until(lambda: calls)
    assert 42 <= calls[0] <= 45.5


def test_a_failing_handler_is_logged_and_the_watcher_ends(fake, caplog):
    def boom(deadline_s: float) -> None:
        raise RuntimeError("router down")

    fake.notice()
    watcher = PreemptionWatcher("aws", fake.url, POLL_S, boom)
    with caplog.at_level(logging.ERROR, logger="splitserve.cluster.preemption"):
        watcher.start()
        watcher.join(5)
    assert not watcher.is_alive() and "router down" in caplog.text


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="cloud"):
        make_source("oracle")
    with pytest.raises(ValueError, match="poll_interval_s"):
        PreemptionWatcher("aws", None, 0, print)


# ---- Ray's node drain -----------------------------------------------------------------------------------------
def test_ray_source_reads_the_draining_table():
    table: dict[str, int] = {}
    source = RayDrainSource("node-a", draining_nodes=lambda: dict(table), clock=lambda: 1000.0)
    calls: list = []
    watcher = PreemptionWatcher("ray", None, POLL_S, calls.append, source=source)
    watcher.start()
    wait_until(lambda: watcher.polls >= 3)
    table["node-b"] = 1_100_000                               # another node: not ours
    wait_until(lambda: watcher.polls >= 6)
    assert calls == []
    table["node-a"] = 1_045_000                               # deadline 45 s after "now"
    wait_until(lambda: calls)
    assert calls == [45.0]


def test_ray_drain_watcher_reports_each_draining_node_once():
    table: dict[str, int] = {"n1": 0}
    seen: list = []
    watcher = RayDrainWatcher(lambda node, d: seen.append((node, d)), poll_interval_s=POLL_S,
                              draining_nodes=lambda: dict(table), clock=lambda: 10.0)
    watcher.start()
    wait_until(lambda: len(seen) == 1)
    table["n2"] = 70_000
    wait_until(lambda: len(seen) == 2)
    time.sleep(5 * POLL_S)
    watcher.stop()
    assert seen == [("n1", DEFAULT_DEADLINE_S), ("n2", 60.0)]


RAY_DRAIN_SCRIPT = """
import json, time, ray
from ray.core.generated import autoscaler_pb2
from splitserve.cluster.preemption_ray import RayDrainSource, local_node_id
info = ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
gcs = info.address_info["gcs_address"]

@ray.remote
class Busy:
    def ping(self):
        return 1

busy = Busy.remote()
ray.get(busy.ping.remote())          # an idle node would be drained (and gone) at once
node = ray.get_runtime_context().get_node_id()
source = RayDrainSource(gcs_address=gcs)
before = source.check(0)
reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
accepted, _ = ray._raylet.GcsClient(address=gcs).drain_node(node, reason, "test", int(time.time() * 1000) + 60_000)
notice = None
for _ in range(50):
    notice = source.check(0)
    if notice:
        break
    time.sleep(0.1)
print(json.dumps({"local": source.node_id == node, "before": before is None, "accepted": accepted,
                  "deadline": notice and notice.deadline_s}))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ray_node_drain_is_observable_from_the_gcs():
    """A real local Ray 2.60 cluster: a node drain (what `ray drain-node` and the autoscaler do) appears in the
    GCS's draining table with its deadline, read without `ray.init` by the watcher's source."""
    out = subprocess.run([sys.executable, "-c", RAY_DRAIN_SCRIPT], capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["local"] and result["before"] and result["accepted"], result
    assert 50 <= result["deadline"] <= 60, result


# ---- splitserve watch-preemption ------------------------------------------------------------------------------
def test_watch_preemption_drains_this_host_through_the_router(fake):
    router = FakeRouter()
    try:
        fake_ready = threading.Timer(0.3, fake.notice, kwargs={"in_s": 120})
        fake_ready.start()
        code = watch("aws", router.url, metadata_url=fake.url, poll_interval_s=POLL_S)
        assert code == 0
        assert len(router.drains) == 1
        body = router.drains[0]
        assert body["target"] == socket.gethostname() and 115 <= body["deadline_s"] <= 120.5
        assert fake.hits["GET " + AWS_ACTION] >= 2
    finally:
        router.close()


def test_watch_preemption_retries_an_unreachable_router(fake):
    port = free_port()
    fake.notice(in_s=30)
    started: list = []
    threading.Timer(1.5, lambda: started.append(FakeRouter(port))).start()
    try:
        code = watch("gcp", f"http://127.0.0.1:{port}", target="node-7", metadata_url=fake.url,
                     poll_interval_s=POLL_S)
        assert code == 0 and started and started[0].drains[0]["target"] == "node-7"
        assert started[0].drains[0]["deadline_s"] < DEFAULT_DEADLINE_S   # what is left of the 30 s
    finally:
        for r in started:
            r.close()


def test_watch_preemption_reports_a_refused_drain(fake):
    router = FakeRouter()
    router.status = 404
    fake.notice(in_s=30)
    try:
        assert watch("azure", router.url, metadata_url=fake.url, poll_interval_s=POLL_S) == 1
        assert len(router.drains) == 1
    finally:
        router.close()


def test_router_watchers_drain_through_the_router_loop(fake):
    """Inside `splitserve serve`: a Ray node drain and this host's cloud notice both become router.drain calls on
    the router's own event loop; a node with nothing of ours on it is not an error."""
    drained: list = []

    class Router:
        async def drain(self, target: str, deadline_s: float) -> dict:
            if target == "empty-node":
                raise LookupError("no live worker or node matches")
            drained.append((target, deadline_s))
            return {"target": target, "migrated": 0, "recomputed": 0}

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    table: dict[str, int] = {}
    watchers = start_router_watchers(Router(), loop, "aws", metadata_url=fake.url, poll_interval_s=POLL_S,
                                     draining_nodes=lambda: dict(table))
    try:
        table["empty-node"] = 0
        table["node-9"] = 0
        fake.notice(in_s=100)
        wait_until(lambda: len(drained) == 2)
        deadlines = dict(drained)
        assert set(deadlines) == {"node-9", socket.gethostname()}
        assert deadlines["node-9"] == DEFAULT_DEADLINE_S and 97 <= deadlines[socket.gethostname()] <= 100.5
    finally:
        for w in watchers:
            w.stop()
        loop.call_soon_threadsafe(loop.stop)
