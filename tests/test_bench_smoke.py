"""The benchmark harness at its tiny size, so it cannot rot: it builds its C generators, runs
every workload with no tracer and under bpftrace, and writes a result whose shape the report
and later runs rely on. No timings are asserted beyond "positive"."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STATUSES = {"met", "missed", "not measured"}


def _need(cond: bool, why: str) -> None:
    if not cond:
        if os.environ.get("AGENTTRACE_REQUIRE_BPF") == "1":
            pytest.fail(f"AGENTTRACE_REQUIRE_BPF=1 but {why}")
        pytest.skip(why)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def test_unknown_tracer_is_refused_with_the_known_names():
    r = subprocess.run([sys.executable, "-m", "bench", "--tracers", "none,dtrace"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "dtrace" in r.stderr and "bpftrace" in r.stderr


def test_unknown_workload_is_refused():
    r = subprocess.run([sys.executable, "-m", "bench", "--only", "fork_bomb"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "fork_bomb" in r.stderr and "exec_storm" in r.stderr


@pytest.mark.bpf
@pytest.mark.timeout(120)
def test_tiny_run_with_bpftrace(tmp_path):
    _need(os.geteuid() == 0, "needs root (cgroups, bpftrace)")
    _need(shutil.which("bpftrace") is not None, "bpftrace not installed")
    _need(shutil.which("gcc") is not None, "gcc not installed")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "bench", "--size", "tiny", "--rounds", "1",
                        "--tracers", "none,bpftrace", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())

    assert res["schema"] == "agenttrace-bench/1"
    assert res["machine"]["nproc"] >= 1 and res["machine"]["kernel"]
    assert set(res["tracers"]) == {"none", "bpftrace"}
    assert all(t["available"] for t in res["tracers"].values())

    expected_cells = {f"{name}/{pl}" for name, w in res["workloads"].items() for pl in w["placements"]}
    assert {"exec_storm/inside", "exec_storm/outside", "getppid_loop/outside", "burst/inside"} <= expected_cells
    got = {(r["tracer"], f"{r['workload']}/{r['placement']}") for r in res["runs"]}
    assert got == {(t, c) for t in ("none", "bpftrace") for c in expected_cells}
    for run in res["runs"]:
        assert run["elapsed_ns"] > 0 and run["n"] > 0 and run["errors"] == 0, run

    for cell, by_tracer in res["summary"]["workloads"].items():
        assert by_tracer["none"]["ratio"] == 1.0
        assert by_tracer["bpftrace"]["ratio"] > 0
        bt = by_tracer["bpftrace"]
        if cell.endswith("/outside"):
            # scoped to the agent cgroup: nothing from outside may reach the tracer's output
            assert bt["events"] == 0, cell
        elif res["workloads"][cell.split("/")[0]]["event_kind"]:
            assert bt["coverage"] == 1.0, (cell, bt)
            assert bt["cpu_per_event_us"] > 0

    bts = [s for s in res["sessions"] if s["tracer"] == "bpftrace"]
    assert len(bts) == 1 and bts[0]["ok"], bts
    assert bts[0]["startup_s"] > 0 and bts[0]["rss_hwm_kb"] > 0

    goals = res["goals"]
    assert len(goals) == 9 and all(g["status"] in STATUSES for g in goals)
    # agenttrace was not asked for, so none of its goals can claim a verdict
    assert all(g["status"] == "not measured" for g in goals)
    assert res["rate_sweep"]["status"].startswith("not measured")
    assert "## Goals" in (out / "report.md").read_text()

    # cleanup: the agent cgroup is gone and the tracer process with it
    assert not Path(res["agent_cgroup"]["path"]).exists()
    assert not _alive(bts[0]["pid"])


def test_agenttrace_missing_is_reported_not_fatal(tmp_path):
    _need(os.geteuid() == 0, "needs root (cgroups)")
    _need(shutil.which("gcc") is not None, "gcc not installed")
    out = tmp_path / "out"
    env = dict(os.environ, BENCH_AGENTTRACE=str(tmp_path / "no-such-agenttrace"))
    r = subprocess.run([sys.executable, "-m", "bench", "--size", "tiny", "--only", "getppid_loop",
                        "--tracers", "none,agenttrace", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=110, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    for mode in ("agenttrace-monitor", "agenttrace-enforce"):
        assert res["tracers"][mode]["available"] is False
        assert "no-such-agenttrace" in res["tracers"][mode]["reason"]
    assert {r["tracer"] for r in res["runs"]} == {"none"}
    assert res["rate_sweep"]["status"].startswith("not measured: ")
    assert all(g["status"] == "not measured" for g in res["goals"])
    assert "not available: " in (out / "report.md").read_text()
    assert not Path(res["agent_cgroup"]["path"]).exists()
