"""`splitserve chaos`: a short run in CI (a launched 1P+3D cluster, one SIGKILL and one drain under load) whose
report must show every invariant holding; and the pieces of the harness that decide what to hit and what a
stall is, without a cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitserve.bench.chaos_run import (ChaosConfig, Fault, RequestRecord, attribute_reprefill, check_ray, eligible,
                                       percentile, stall_around, stall_figures, summarize_ray_usage)

LAUNCH = "--prefill-workers 1 --decode-workers 3 --dtype float32 --kv-cache-gb 0.25 --cpus-per-worker 0.5"


def chaos_command() -> list[str]:
    """`splitserve chaos` once the lead has registered it in the CLI, else the same command by module."""
    from splitserve.cli import build_parser

    registered = "chaos" in build_parser()._subparsers._group_actions[0].choices
    return [sys.executable, "-m", "splitserve.cli", "chaos"] if registered else [sys.executable, "-m",
                                                                                   "splitserve.cmd_chaos"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_short_mixed_run_keeps_every_invariant(tmp_path):
    cmd = chaos_command() + ["--duration", "40", "--kill-every", "15", "--mode", "mixed", "--victims", "decode",
                             "--launch", LAUNCH, "--prompt-tokens", "64", "--max-tokens", "16", "--concurrency", "4",
                             "--request-timeout", "60", "--idle-timeout", "60", "--json", "--log-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.stdout.strip(), out.stderr[-4000:]
    report = json.loads(out.stdout)
    failing = {k: v for k, v in report["invariants"].items() if v["ok"] is not True}
    assert not failing, (json.dumps(failing, indent=1) + "\nsuspects: " + json.dumps(report["suspect_requests"])
                         + "\nfaults: " + json.dumps(report["faults"]) + "\n" + report["server"].get("log_tail", ""))
    assert report["ok"] and out.returncode == 0
    kinds = [f["kind"] for f in report["faults"] if "skipped" not in f and "error" not in f]
    assert kinds == ["kill", "drain"], report["faults"]
    drain = report["faults"][1]
    assert drain["held"] == 0 or drain["migrated"] >= 1      # a drain with time to spare moves live KV
    assert report["requests"]["finished"] == report["requests"]["total"] > 4
    for kind in ("kill", "drain"):
        stall = report["stalls"][kind]
        assert stall["faults"] == 1 and (stall["affected"] == 0 or stall["p99_s"] >= stall["p50_s"] > 0)


# ---- the harness's own logic, no cluster ---------------------------------------------------------------------
def worker(wid: str, role: str, alive: bool = True, draining: bool = False) -> dict:
    return {"worker_id": wid, "role": role, "pid": 1, "node_id": "n", "hostname": "h", "alive": alive,
            "draining": draining}


def test_faults_never_hit_the_last_serving_decode_worker():
    pool = [worker("p0", "prefill"), worker("d0", "decode"), worker("d1", "decode")]
    assert [w["worker_id"] for w in eligible("kill", pool, set())] == ["p0", "d0", "d1"]
    assert [w["worker_id"] for w in eligible("drain", pool, set())] == ["d0", "d1"]        # prefill: no live KV
    assert [w["worker_id"] for w in eligible("kill", pool, {"d0"})] == ["p0"]              # d1 is the last one
    assert eligible("drain", pool, {"d0"}) == []
    drained = [worker("p0", "prefill"), worker("d0", "decode", draining=True), worker("d1", "decode")]
    assert eligible("drain", drained, set()) == []
    dead = [worker("p0", "prefill", alive=False), worker("d0", "decode"), worker("d1", "decode")]
    assert [w["worker_id"] for w in eligible("kill", dead, set(), victims="decode")] == ["d0", "d1"]
    assert eligible("kill", dead, set(), victims="prefill") == []


def record(times: list[float], done: float, error: str | None = None) -> RequestRecord:
    return RequestRecord(0, "r", {}, [], sent_at=0.0, times=times, seqs=list(range(1, len(times) + 1)),
                         done_at=done, error=error)


def test_stall_is_the_longest_gap_around_the_fault():
    r = record([1.0, 1.1, 1.2, 3.0, 3.1, 3.2], done=3.2)
    assert stall_around(r, at=1.15, window=5) == pytest.approx(1.8)      # the gap 1.2 -> 3.0 after the fault
    assert stall_around(r, at=0.5, window=5) is None                    # no chunk yet at the fault
    assert stall_around(r, at=4.0, window=5) is None                    # already done
    assert stall_around(r, at=1.15, window=0.01) == pytest.approx(0.1)  # only gaps starting inside the window
    failed = record([1.0, 1.1], done=61.1, error="DEADLINE_EXCEEDED")
    assert stall_around(failed, at=1.05, window=5) == pytest.approx(60.0)   # a lost stream stalls until its end


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([5.0], 99) == 5.0


def test_bad_options_name_the_flag():
    with pytest.raises(ValueError, match="--kill-every"):
        ChaosConfig(kill_every_s=0)
    with pytest.raises(ValueError, match="--mode"):
        ChaosConfig(mode="explode")
    with pytest.raises(ValueError, match="--max-tokens"):
        ChaosConfig(max_tokens=0)
    assert ChaosConfig(url="http://10.0.0.5:8000").grpc == "10.0.0.5:50051"


def test_ray_check_finds_a_placement_group_left_by_a_dead_worker():
    def node(groups: dict[str, float], cpu_free: float) -> list[dict]:
        """One node with 2 CPUs; `groups`: placement group id -> CPU used by a live actor in it (0: none)."""
        total, free = {"CPU": 2.0, "memory": 8e9, "node:10.0.0.1": 1.0}, {"CPU": cpu_free, "memory": 8e9}
        for pg, used in groups.items():
            total[f"CPU_group_{pg}"] = total[f"CPU_group_0_{pg}"] = 0.5
            total[f"bundle_group_{pg}"] = 1000.0
            free[f"CPU_group_{pg}"] = free[f"CPU_group_0_{pg}"] = 0.5 - used
        return [{"total": total, "available": free}]

    before = summarize_ray_usage(node({"aa": 0.5, "bb": 0.5}, cpu_free=1.0))
    assert before["outside"]["CPU"] == 0 and before["idle_groups"] == []
    killed = summarize_ray_usage(node({"aa": 0.5, "bb": 0.0}, cpu_free=1.0))      # bb's worker died, group kept
    plain, groups = check_ray(before, killed, live_workers=1)
    assert plain["ok"] and not groups["ok"] and "bb" in groups["detail"]
    released = summarize_ray_usage(node({"aa": 0.5}, cpu_free=1.5))               # its group removed
    assert all(c["ok"] for c in check_ray(before, released, live_workers=1))
    leaked = summarize_ray_usage(node({"aa": 0.5}, cpu_free=0.5))                 # 1 CPU held by something else
    plain, _ = check_ray(before, leaked, live_workers=1)
    assert not plain["ok"] and "CPU 0 -> 1" in plain["detail"]


def test_reprefilled_tokens_go_to_the_fault_before_them():
    faults = [Fault("drain", 1.0, "d0", "decode", injected=True, held=1, reprefill_before=100.0),
              Fault("kill", 2.0, skipped="no eligible worker"),
              Fault("kill", 3.0, "d1", "decode", injected=True, held=1, reprefill_before=100.0),
              Fault("drain", 5.0, "d2", "decode", injected=True, held=1, reprefill_before=612.0)]
    attribute_reprefill(faults, final=612.0)
    assert [f.reprefill_tokens for f in faults] == [0.0, None, 512.0, 0.0]
    recs = [record([0.5, 1.5, 1.6], done=1.6), record([2.5, 3.5, 3.6], done=3.6), record([4.5, 5.2], done=5.2)]
    stalls, per_fault = stall_figures(recs, faults, window=0.5)
    assert stalls["drain"]["reprefill_tokens"] == 0 and stalls["kill"]["reprefill_tokens"] == 512
    assert stalls["drain"]["affected"] == 2 and stalls["kill"]["samples_s"] == [1.0]
    unknown = [Fault("kill", 1.0, "d0", "decode", injected=True)]      # a server without the counter
    attribute_reprefill(unknown, final=None)
    assert stall_figures(recs, unknown, window=0.5)[0]["kill"]["reprefill_tokens"] is None
