"""Prometheus metrics, named as vLLM names them so existing Grafana dashboards work, plus splitserve's own.

One `Metrics` per server, each with its own `CollectorRegistry` (never the global one, so two servers in one
process, as in tests, do not collide). The services call the `observe_*` / `count_*` methods as requests move;
the HTTP layer calls `set_load(service.load())` and `render()` on each scrape of `/metrics`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .service import LoadInfo

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0)
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        self.time_to_first_token = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.",
                                             m, buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.",
                                             m, buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("vllm:e2e_request_latency_seconds",
                                             "End-to-end request latency in seconds.", m, buckets=_REQUEST_BUCKETS,
                                             registry=r)
        self.request_queue_time = Histogram("vllm:request_queue_time_seconds",
                                            "Time requests spent waiting before their first step, in seconds.", m,
                                            buckets=_REQUEST_BUCKETS, registry=r)
        self.num_requests_running = Gauge("vllm:num_requests_running", "Requests in the running batches.", m,
                                          registry=r)
        self.num_requests_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", m,
                                          registry=r)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", m,
                                    registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", m, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                       m + ["finished_reason"], registry=r)
        self.kv_transfer_bytes = Counter("splitserve_kv_transfer_bytes", "KV-cache bytes sent between workers.",
                                         registry=r)
        self.kv_transfer_seconds = Histogram("splitserve_kv_transfer_seconds",
                                             "One request's KV transfer, handshake to last page in place "
                                             "(spans the streamed prefill).",
                                             buckets=_TRANSFER_BUCKETS, registry=r)
        self.placement_decisions = Counter("splitserve_placement_decisions", "Placement decisions, by reason.",
                                           ["reason"], registry=r)
        self.migrations = Counter("splitserve_migrations", "Requests moved live between decode workers.",
                                  registry=r)
        self.recoveries = Counter("splitserve_recoveries", "Requests recovered after a worker failure.",
                                  registry=r)
        self.reprefill_tokens = Counter("splitserve_reprefill_tokens",
                                        "Tokens (prompt + committed) prefilled again because a request was re-placed "
                                        "after a fault, less the prefix-cache hits placement expected; a live "
                                        "migration adds none.", registry=r)
        self.admission_decisions = Counter("splitserve_admission_decisions",
                                           "Admission control outcomes: admitted, admitted_after_wait, rejected.",
                                           ["decision"], registry=r)
        self.admission_waiting = Gauge("splitserve_admission_waiting", "Requests waiting for admission.",
                                       registry=r)
        self.prefix_cache_hit_tokens = Counter("splitserve_prefix_cache_hit_tokens",
                                               "Prompt tokens served from the prefix cache.", registry=r)

    # ---- per request (seconds are durations measured by the caller) ---------------------------------------
    def observe_queue_time(self, seconds: float) -> None:
        self.request_queue_time.labels(self.model_name).observe(max(0.0, seconds))

    def observe_first_token(self, seconds: float, num_prompt_tokens: int = 0, num_cached_tokens: int = 0,
                            num_tokens: int = 1) -> None:
        """A request's first `num_tokens` tokens arrived `seconds` after it did (they count as generated)."""
        self.time_to_first_token.labels(self.model_name).observe(max(0.0, seconds))
        if num_tokens:
            self.generation_tokens.labels(self.model_name).inc(num_tokens)
        if num_prompt_tokens:
            self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)
        if num_cached_tokens:
            self.prefix_cache_hit_tokens.inc(num_cached_tokens)

    def observe_token(self, seconds_since_previous: float | None, num_tokens: int = 1) -> None:
        """`num_tokens` more tokens of a request, `seconds_since_previous` after its previous ones."""
        if num_tokens:
            self.generation_tokens.labels(self.model_name).inc(num_tokens)
        if seconds_since_previous is not None:
            self.inter_token_latency.labels(self.model_name).observe(max(0.0, seconds_since_previous))

    def observe_finished(self, finish_reason: str, e2e_seconds: float) -> None:
        self.request_success.labels(self.model_name, finish_reason or "unknown").inc()
        self.e2e_request_latency.labels(self.model_name).observe(max(0.0, e2e_seconds))

    # ---- cluster events (called by the router) -------------------------------------------------------------
    def count_placement(self, reason: str) -> None:
        self.placement_decisions.labels(reason).inc()

    def observe_kv_transfer(self, num_bytes: int, seconds: float | None) -> None:
        self.kv_transfer_bytes.inc(num_bytes)
        if seconds is not None:
            self.kv_transfer_seconds.observe(max(0.0, seconds))

    def count_migration(self, n: int = 1) -> None:
        self.migrations.inc(n)

    def count_recovery(self, n: int = 1) -> None:
        self.recoveries.inc(n)

    def count_reprefill(self, num_tokens: int) -> None:
        self.reprefill_tokens.inc(max(0, num_tokens))

    def count_admission(self, decision: str) -> None:
        self.admission_decisions.labels(decision).inc()

    def set_admission_waiting(self, n: int) -> None:
        self.admission_waiting.set(n)

    def count_prefix_hit_tokens(self, n: int) -> None:
        self.prefix_cache_hit_tokens.inc(n)

    # ---- scrape ---------------------------------------------------------------------------------------------
    def set_load(self, load: LoadInfo) -> None:
        self.num_requests_running.labels(self.model_name).set(load.num_running)
        self.num_requests_waiting.labels(self.model_name).set(load.num_waiting)
        self.kv_cache_usage.labels(self.model_name).set(load.kv_cache_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
