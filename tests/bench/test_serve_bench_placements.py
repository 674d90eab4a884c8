"""`splitserve bench serve` reads a splitserve server's placement decisions from /metrics (and nothing from others)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from splitserve.bench.serve_bench import placement_counts

METRICS = """# HELP splitserve_placement_decisions_total Placement decisions, by reason.
# TYPE splitserve_placement_decisions_total counter
splitserve_placement_decisions_total{reason="prefill_remote"} 14.0
splitserve_placement_decisions_total{reason="decode_local_backlog"} 2.0
splitserve_placement_decisions_created{reason="prefill_remote"} 1.7e+09
vllm:num_requests_running{model_name="m"} 0.0
"""


@pytest.fixture
def server():
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = METRICS.encode() if self.path == "/metrics" else b"not found"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()


def test_counts_by_reason_from_the_v1_base_url(server):
    url, seen = server
    assert placement_counts(url + "/v1", "secret") == {"prefill_remote": 14.0, "decode_local_backlog": 2.0}
    assert seen == ["Bearer secret"]


def test_other_servers_give_nothing(server):
    url, _ = server
    assert placement_counts(url + "/elsewhere/v1", None) == {}            # 404
    assert placement_counts("http://127.0.0.1:9/v1", None) == {}          # nothing listening
