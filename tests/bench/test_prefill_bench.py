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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chunks_beside_decodes_are_timed_against_the_prompt_alone(capsys):
    argv = ["bench", "prefill", "--tokens", "24", "--dtypes", "float32", "--reps", "1", "--beside-decodes", "2",
            "--chunks", "8,24", "--json"]
    assert cli_main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["beside_decodes"] == 2
    rows = {r["chunk"]: r for r in report["beside"]}
    assert sorted(rows) == [8, 24]
    assert rows[8]["steps"] == 3 and rows[24]["steps"] == 1          # 24 tokens in chunks of 8, then in one
    for r in rows.values():
        assert r["decode_s"] > 0 and r["mixed_s"] > 0 and r["engine_s"] > 0
        assert r["beside_s"] == pytest.approx(r["steps"] * (r["mixed_s"] - r["decode_s"]))


@pytest.mark.parametrize("argv,field", [(["--tokens", "0"], "--tokens"), (["--dtypes", "int8"], "--dtypes"),
                                        (["--reps", "0"], "--reps"), (["--chunks", "0"], "--chunks"),
                                        (["--beside-decodes", "-1"], "--beside-decodes")])
def test_bad_options_are_named(argv, field, capsys):
    from splitserve.bench import prefill_bench

    assert prefill_bench.main(argv) == 2
    assert field in capsys.readouterr().err
