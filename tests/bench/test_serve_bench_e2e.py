"""`splitserve bench serve` end to end: it launches `splitserve serve --embedded`, runs 3 short requests, stops it."""

from __future__ import annotations

import json

import pytest

from splitserve.bench import serve_bench


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_short_real_run_against_a_launched_embedded_server(capsys, tmp_path):
    code = serve_bench.main([
        "--launch", "embedded:--embedded --dtype float32 --kv-cache-gb 0.1", "--log-dir", str(tmp_path),
        "--num-prompts", "3", "--input-len", "24", "--output-len", "4", "--request-rate", "inf", "--warmup", "1",
        "--ttft-slo-ms", "60000", "--tpot-slo-ms", "60000", "--quiet", "--json",
        "--tpot-slo-grid", "0.001,60000", "--baseline", "embedded"])
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert code == 0, report["targets"]
    (run,) = report["runs"]
    s = run["summary"]
    assert run["label"] == "embedded" and run["rate"] == "inf"
    assert s["completed"] == 3 and s["failed"] == 0
    assert s["total_output_tokens"] == 12                       # ignore_eos: exactly --output-len each
    assert s["total_input_tokens"] == 3 * 24                    # the server's own count of the token-id prompts
    assert 0 < s["ttft_ms"]["p50"] <= s["e2el_ms"]["p50"]
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    assert len(s["requests"]) == 3 and all(r["ok"] and r["output_tokens"] == 4 for r in s["requests"])
    # the SLO grid (on stderr with --json): a 1 us TPOT target breaks at once, 60 s never does
    assert "| 0.001 | inf | " in out.err and "| 60000 | never" in out.err
    (target,) = report["targets"]
    assert target["returncode"] == 0 and target["problem"] is None
    # the saved output re-reports without a server, with goodput recomputed for other targets
    saved = tmp_path / "run.json"
    saved.write_text(out.out)
    assert serve_bench.main(["--from-json", str(saved), "--ttft-slo-ms", "0.001", "--plot", str(tmp_path / "p.png"),
                             "--tpot-slo-grid", "60000", "--baseline", "embedded"]) == 0
    table = capsys.readouterr().out
    assert "| embedded | inf | 3/0 |" in table and "| 0.000 | 0% |" in table and "| 60000 | never" in table
    assert (tmp_path / "p.png").stat().st_size > 0


def test_slo_grid_needs_a_baseline_that_is_launched():
    with pytest.raises(ValueError, match="--baseline"):
        serve_bench.main(["--launch", "a:--embedded", "--tpot-slo-grid", "50", "--baseline", "b"])
    with pytest.raises(ValueError, match="--tpot-slo-grid"):
        serve_bench.main(["--launch", "a:--embedded", "--tpot-slo-grid", "fast", "--baseline", "a"])


def test_launch_specs_and_rates_parse():
    spec = serve_bench.LaunchSpec.parse("disaggregated:--prefill-workers 1 --decode-workers 1")
    assert spec.label == "disaggregated" and spec.args == ["--prefill-workers", "1", "--decode-workers", "1"]
    bare = serve_bench.LaunchSpec.parse("--address 10.0.0.1:6379")          # a colon inside the args, no label
    assert bare.args == ["--address", "10.0.0.1:6379"]
    assert serve_bench.parse_rates("0.5,1, inf") == [0.5, 1.0, float("inf")]
    with pytest.raises(ValueError, match="sweep-rates"):
        serve_bench.parse_rates("0.5,0")
