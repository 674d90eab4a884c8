"""Fuzz every HTTP operation from the server's own OpenAPI schema (schemathesis, positive and negative data):
no 5xx, and the server still serves a normal request afterwards."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from conftest import TEXT_PROMPT
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

MAX_EXAMPLES = 25
FUZZ_MAX_TOKENS = 2      # keep generation short: the fuzzing is about the input handling


def _short(case) -> None:
    """Cap the generated lengths (a fuzzed max_tokens of 10**6 would just run the model for a long time)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > FUZZ_MAX_TOKENS:
            body[name] = FUZZ_MAX_TOKENS
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = FUZZ_MAX_TOKENS      # chat defaults to the whole context


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzz_http_api(server, mode):
    schema = schemathesis.openapi.from_dict(server.frontends.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"} <= labels
    failures, statuses = [], {}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        for op in operations:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                _short(case)
                r = case.call(base_url=server.base_url, timeout=60)
                statuses[op.label] = statuses.get(op.label, []) + [r.status_code]
                if r.status_code >= 500:
                    failures.append(f"{op.label}: {r.status_code} for {case.body!r:.300}: {r.text[:300]}")

            try:
                run()
            except Unsatisfiable:       # negative data for an operation with no inputs: nothing to break
                assert mode == schemathesis.GenerationMode.NEGATIVE, op.label
        if mode == schemathesis.GenerationMode.POSITIVE:     # some valid requests did run the model
            assert any(200 in statuses.get(op, []) for op in ("POST /v1/completions", "POST /v1/chat/completions"))
        assert not failures, "\n".join(failures[:10])
        r = http.post("/v1/completions", json={"prompt": TEXT_PROMPT, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2

