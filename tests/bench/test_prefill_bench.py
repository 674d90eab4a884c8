"""`splitserve bench prefill` runs both systems for real on a tiny prompt and refuses bad options by name."""

from __future__ import annotations

import json

import pytest

from splitserve.cli import main as cli_main


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_real_run_reports_both_systems(capsys):
    assert cli_main(["bench", "prefill", "--tokens", "8,24", "--dtypes", "float32", "--reps", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["benchmark"] == "prefill" and report["threads"] == 1
    assert [(r["dtype"], r["tokens"]) for r in report["rows"]] == [("float32", 8), ("float32", 24)]
    assert all(r["engine_s"] > 0 and r["hf_s"] > 0 for r in report["rows"])


@pytest.mark.parametrize("argv,field", [(["--tokens", "0"], "--tokens"), (["--dtypes", "int8"], "--dtypes"),
                                        (["--reps", "0"], "--reps")])
def test_bad_options_are_named(argv, field, capsys):
    from splitserve.bench import prefill_bench

    assert prefill_bench.main(argv) == 2
    assert field in capsys.readouterr().err
