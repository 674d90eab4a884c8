"""`splitserve bench kv`: the harness runs end to end on tiny sizes and its TTFT summary reads the right times
(its numbers are for docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

import pytest

from splitserve.bench import kv_bench, kv_ttft


def test_throughput_and_synthetic_overlap_run_end_to_end(capsys):
    r = kv_bench.run(tokens=(64,), dtypes=("float32",), reps=1, compute_ms_per_layer=0.2, overlap_tokens=64,
                     overlap_dtype="float32", ttft_tokens=())
    (row,) = r["throughput"]
    assert row["ok"] and row["tokens"] == 64 and row["ratio"] > 0 and row["frag_ratio"] > 0
    assert r["overlap"]["ok"] and "ttft" not in r
    assert "kv_transfer / raw" in capsys.readouterr().out


def test_ttft_summary_takes_the_later_of_first_token_and_last_page():
    rounds = [("warmup-streamed", 0.0, 9.0, 9.0), ("prefill", 0.0, 1.0, None), ("streamed", 10.0, 11.2, 11.1),
              ("serial", 20.0, 21.0, 21.5), ("prefill", 30.0, 31.0, None), ("streamed", 40.0, 41.0, 41.3),
              ("serial", 50.0, 51.0, 51.4)]
    send = [dict(kind=k, tokens=8, dtype="float32", t0=t0, t_token=tok, ok=True, cpu_s=1.0)
            for k, t0, tok, _ in rounds]
    recv = [dict(kind=k, **({} if kv is None else dict(t_kv=kv, ok=True))) for k, _, _, kv in rounds]
    (row,) = kv_ttft.summarize(send, recv)
    assert row["prefill_ms"] == pytest.approx(1000) and row["streamed_ms"] == pytest.approx(1250)
    assert row["serial_ms"] == pytest.approx(1450) and row["reps"] == 2 and row["ok"]
    assert row["ratio"] == pytest.approx(1.25) and row["paired_ratio"] == pytest.approx(1.25)
    assert row["kv_after_token_ms"] == pytest.approx(100)        # median of -100 ms and +300 ms
    assert row["exposed_ms"] == pytest.approx(150) and row["cpu_ratio"] == 1.0   # of 0 and 300 ms


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="reps"):
        kv_bench.run(tokens=(64,), reps=0, ttft_tokens=())
