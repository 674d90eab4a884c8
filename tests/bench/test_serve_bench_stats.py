"""`splitserve bench serve` statistics on fabricated timings: percentiles, TPOT, goodput, throughput."""

from __future__ import annotations

import math

import pytest

from splitserve.bench.serve_load import RequestResult
from splitserve.bench.serve_report import (capacity_table, goodput_at, latency_stats, markdown_table, meets_slo,
                                           slo_grid_table, summarize, sustained_rate, tpot)


def result(ttft: float, latency: float, output_tokens: int, ok: bool = True, prompt_tokens: int = 100,
           error: str = "") -> RequestResult:
    gaps = [(latency - ttft) / (output_tokens - 1)] * (output_tokens - 1) if ok and output_tokens > 1 else []
    return RequestResult(ok=ok, input_len=prompt_tokens, output_len=output_tokens, prompt_tokens=prompt_tokens,
                         output_tokens=output_tokens if ok else 0, ttft=ttft, itl=gaps, latency=latency, error=error)


def test_percentiles_interpolate_linearly_in_ms():
    stats = latency_stats([i / 1000 for i in range(1, 101)])      # 1..100 ms
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)


def test_percentiles_of_nothing_are_nan_not_an_error():
    assert all(math.isnan(v) for v in latency_stats([]).values())


def test_tpot_excludes_the_first_token():
    assert tpot(result(ttft=0.5, latency=1.5, output_tokens=11)) == pytest.approx(0.1)
    assert tpot(result(ttft=0.5, latency=0.5, output_tokens=1)) == 0.0


def test_goodput_counts_requests_meeting_both_targets():
    results = [result(0.2, 1.2, 11),      # TTFT 200 ms, TPOT 100 ms: meets both
               result(0.2, 2.2, 11),      # TPOT 200 ms: misses TPOT
               result(0.9, 1.9, 11),      # TTFT 900 ms: misses TTFT
               result(0.3, 0.8, 6),       # TTFT 300, TPOT 100: meets both
               result(0.1, 0.0, 0, ok=False, error="HTTP 500: boom")]
    s = summarize(results, duration=10.0, ttft_slo_ms=500, tpot_slo_ms=150)
    assert s["completed"] == 4 and s["failed"] == 1
    assert s["goodput"] == pytest.approx(0.2)               # 2 good requests in 10 s
    assert s["slo_attainment"] == pytest.approx(2 / 5)      # failed requests count against attainment
    assert s["request_throughput"] == pytest.approx(0.4)
    assert s["output_throughput"] == pytest.approx((11 * 3 + 6) / 10)
    assert s["total_input_tokens"] == 400
    assert s["errors"] == [{"count": 1, "error": "HTTP 500: boom"}]
    assert s["tpot_ms"]["mean"] == pytest.approx((100 + 200 + 100 + 100) / 4)
    assert s["ttft_ms"]["p50"] == pytest.approx(250)
    # ITL pools every gap: 10 + 10 + 10 gaps of 100/200/100 ms and 5 of 100 ms
    assert s["itl_ms"]["mean"] == pytest.approx((10 * 100 + 10 * 200 + 10 * 100 + 5 * 100) / 35)


def test_one_slo_alone_and_no_slo():
    slow_first = result(2.0, 2.5, 6)
    assert meets_slo(slow_first, None, 150) and not meets_slo(slow_first, 1000, None)
    s = summarize([slow_first], duration=5.0)
    assert s["goodput"] is None and s["slo_attainment"] is None


def test_all_failed_reports_zero_throughput_and_the_error():
    s = summarize([result(0, 0, 0, ok=False, error="ConnectError: refused")] * 3, duration=1.0, tpot_slo_ms=100)
    assert s["completed"] == 0 and s["failed"] == 3 and s["goodput"] == 0.0
    assert math.isnan(s["ttft_ms"]["p99"])
    assert s["errors"] == [{"count": 3, "error": "ConnectError: refused"}]


def test_markdown_table_has_one_row_per_run():
    s = summarize([result(0.2, 1.2, 11)], duration=2.0, ttft_slo_ms=500, tpot_slo_ms=150)
    table = markdown_table([{"label": "a", "rate": 0.5, "summary": s}, {"label": "b", "rate": math.inf, "summary": s}])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| a | 0.5 |") and lines[3].startswith("| b | inf |")


def test_goodput_for_other_targets_from_the_kept_requests():
    results = [result(0.2, 1.2, 11), result(0.2, 2.2, 11), result(0.9, 1.9, 11)]   # TPOT 100, 200, 100 ms
    s = summarize(results, duration=10.0, ttft_slo_ms=500, tpot_slo_ms=150)
    assert goodput_at(s, 500, 150) == pytest.approx(s["goodput"]) == pytest.approx(0.1)
    assert goodput_at(s, None, 250) == pytest.approx(0.3)
    assert goodput_at(s, 1000, 90) == pytest.approx(0.0)


def test_slo_grid_finds_where_the_baseline_breaks_and_compares_there():
    def run(label, rate, tpots):          # TTFT 100 ms, 11 tokens, TPOTs in ms
        rs = [result(0.1, 0.1 + t * 10 / 1000, 11) for t in tpots]
        return {"label": label, "rate": rate, "summary": summarize(rs, duration=10.0)}
    runs = [run("colocated", 1.0, [50, 60]), run("colocated", 2.0, [50, 90, 120]),
            run("disagg", 1.0, [50, 55]), run("disagg", 2.0, [55, 60, 65])]
    table = slo_grid_table(runs, None, [70, 100, 200], "colocated").splitlines()
    # 70 ms: colocated's p99 TPOT (60) holds at 1.0, breaks at 2.0, where 1 of its 3 requests meets it and 3 of 3
    # of disagg's: goodput 0.1 against 0.3
    assert table[2].startswith("| 70 | 2 | ") and "0.100" in table[2] and "0.300, 3.00x" in table[2]
    assert "0.200" in table[3] and "0.300, 1.50x" in table[3]                         # 100 ms
    assert "never" in table[4]                                                         # 200 ms: never broken
    with pytest.raises(ValueError, match="--baseline"):
        slo_grid_table(runs, None, [70], "nope")


def test_sustained_rate_interpolates_the_90_percent_crossing():
    assert sustained_rate([(1.0, 1.0), (2.0, 0.5)]) == (pytest.approx(1.2), "1.20")      # 1 + 1 * 0.1 / 0.5
    assert sustained_rate([(1.0, 0.95), (2.0, 0.92)]) == (2.0, ">= 2")                     # never below: a bound
    assert sustained_rate([(1.0, 0.8), (2.0, 0.5)]) == (None, "< 1")


def test_capacity_table_compares_sustained_rates():
    def run(label, rate, tpots):
        rs = [result(0.1, 0.1 + t * 10 / 1000, 11) for t in tpots]
        return {"label": label, "rate": rate, "summary": summarize(rs, duration=10.0)}
    runs = [run("colocated", 1.0, [50] * 10), run("colocated", 2.0, [50] * 5 + [120] * 5),
            run("disagg", 1.0, [50] * 10), run("disagg", 2.0, [60] * 10)]
    assert capacity_table(runs, None, [100], "colocated").splitlines()[2] == "| 100 | 1.20 | >= 2 |"   # a bound
    runs.append(run("disagg", 3.0, [60] * 5 + [150] * 5))          # crosses 90% at 2 + 1 * 0.1 / 0.5 = 2.2
    assert capacity_table(runs, None, [100], "colocated").splitlines()[2] == "| 100 | 1.20 | 2.20, 1.83x |"
