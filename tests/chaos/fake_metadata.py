"""Test doubles on 127.0.0.1: one fake instance-metadata server speaking AWS IMDSv2, GCP and Azure, switched to
"notice" mode with `notice()`, and a fake router that records `POST /admin/drain`.

    fake = FakeMetadata()                      # fake.url = http://127.0.0.1:PORT, serves all three clouds
    fake.notice(in_s=120)                      # AWS instance-action / GCP preempted=TRUE / Azure Preempt event
    fake.close()

It checks what the real services check (the IMDSv2 token, `Metadata-Flavor: Google`, `Metadata: true`,
`api-version`), answers GCP's `wait_for_change` long polls, and counts requests per path.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

AWS_ACTION = "/latest/meta-data/spot/instance-action"
GCP_PREEMPTED = "/computeMetadata/v1/instance/preempted"
AZURE_EVENTS = "/metadata/scheduledevents"
AZURE_NAME = "/metadata/instance/compute/name"


class FakeMetadata:
    def __init__(self, port: int = 0, vm_name: str = "splitserve-vm-1") -> None:
        self.vm_name = vm_name
        self.hits: Counter = Counter()
        self.notice_at: float | None = None        # epoch seconds the node goes away; None: no notice
        self.with_time = True                      # False: Azure NotBefore "" / AWS without "time"
        self.other_vm_events: list[dict] = []      # Azure events for other VMs of the availability set
        self.tokens: set[str] = set()
        self._closed = False
        self._etag = 1
        self._changed = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def notice(self, in_s: float = 120.0, with_time: bool = True) -> None:
        with self._changed:
            self.notice_at, self.with_time = time.time() + in_s, with_time
            self._etag += 1
            self._changed.notify_all()

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # ---- answers ---------------------------------------------------------------------------------------------
    def aws_action(self) -> dict | None:
        if self.notice_at is None:
            return None
        at = datetime.fromtimestamp(self.notice_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"action": "terminate", "time": at} if self.with_time else {"action": "terminate"}

    def gcp_preempted(self, wait: bool, last_etag: str | None, timeout_s: float) -> tuple[str, str]:
        with self._changed:
            if wait and last_etag == str(self._etag):
                self._changed.wait_for(lambda: self._closed or str(self._etag) != last_etag, timeout=timeout_s)
            return ("TRUE" if self.notice_at is not None else "FALSE"), str(self._etag)

    def azure_events(self) -> dict:
        events = list(self.other_vm_events)
        if self.notice_at is not None:
            not_before = format_datetime(datetime.fromtimestamp(self.notice_at, timezone.utc), usegmt=True)
            events.append({"EventId": "A1B2C3", "EventType": "Preempt", "ResourceType": "VirtualMachine",
                           "Resources": [self.vm_name], "EventStatus": "Scheduled",
                           "NotBefore": not_before if self.with_time else "", "Description": "Spot eviction",
                           "EventSource": "Platform", "DurationInSeconds": -1})
        return {"DocumentIncarnation": self._etag, "Events": events}


def _handler(fake: FakeMetadata):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:     # quiet
            pass

        def _send(self, status: int, body: str = "", content_type: str = "text/plain", headers: dict | None = None):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            fake.hits["PUT " + self.path] += 1
            if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self._send(400, "bad token request")
            token = f"tok-{len(fake.tokens) + 1}-{time.monotonic_ns()}"
            fake.tokens.add(token)
            self._send(200, token)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            fake.hits["GET " + url.path] += 1
            if url.path == AWS_ACTION:
                if self.headers.get("X-aws-ec2-metadata-token") not in fake.tokens:
                    return self._send(401, "unauthorized")
                action = fake.aws_action()
                return self._send(404, "Not Found") if action is None else self._send(200, json.dumps(action),
                                                                                        "application/json")
            if url.path == GCP_PREEMPTED:
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403, "missing Metadata-Flavor: Google")
                value, etag = fake.gcp_preempted(query.get("wait_for_change") == "true", query.get("last_etag"),
                                                 float(query.get("timeout_sec", "60")))
                return self._send(200, value, headers={"ETag": etag, "Metadata-Flavor": "Google"})
            if url.path in (AZURE_EVENTS, AZURE_NAME):
                if self.headers.get("Metadata") != "true" or "api-version" not in query:
                    return self._send(400, "missing Metadata: true or api-version")
                if url.path == AZURE_NAME:
                    return self._send(200, fake.vm_name)
                return self._send(200, json.dumps(fake.azure_events()), "application/json")
            self._send(404, "Not Found")

    return Handler


class FakeRouter:
    """Answers `POST /admin/drain` like the router and records each body; `status` sets the answer's code."""

    def __init__(self, port: int = 0) -> None:
        self.drains: list[dict] = []
        self.status = 200
        router = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                if self.path == "/admin/drain":
                    router.drains.append(body)
                    out = {"target": body.get("target"), "workers": ["d0"], "migrated": 1, "recomputed": 0,
                           "seconds": 0.1}
                    data = json.dumps(out if router.status == 200 else {"error": {"message": "no such target"}})
                    status = router.status
                else:
                    data, status = "{}", 404
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
