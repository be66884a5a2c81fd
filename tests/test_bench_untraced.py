"""The untraced-syscall phase (bench/untraced.py): its statistics on synthetic blocks (neighbour
ratios, intervals over cycles, the goal and its fall-back to the rounds for older results), and
one tiny run through `python -m bench` as a user starts it. No timing is asserted."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import goals, interval, untraced

REPO = Path(__file__).resolve().parent.parent
PLACE = {"apart": 1, "together": 0}


def _figs(v: float) -> dict:
    one = {"cpu": {"floor": v, "median": v * 1.05}, "wall": {"floor": v, "median": v * 1.1},
           "chunks": 10, "chunk_n": 1000, "errors": 0}
    return {w: {pl: dict(one) for pl in PLACE} for w in untraced.WORKLOADS}


def _sequence(on: dict, off: list) -> list:
    """off[0], on config 1, off[1], on config 2, ...: `on` is [(config, cycle, value)]."""
    seq = [{"config": None, "cycle": 0, "figures": _figs(off[0])}]
    for i, (c, cyc, v) in enumerate(on):
        seq.append({"config": c, "cycle": cyc, "figures": _figs(v)} if v is not None
                   else {"config": c, "cycle": cyc, "error": "tracer failed"})
        seq.append({"config": None, "cycle": cyc, "figures": _figs(off[i + 1])})
    return seq


def test_each_on_block_is_divided_by_the_geometric_mean_of_its_off_neighbours():
    seq = _sequence([("a", 0, 110.0), ("none", 0, 100.0), ("a", 1, 121.0)], [100.0, 100.0, 121.0, 121.0])
    r = untraced.neighbour_ratios(seq, "cpu", "getppid", "apart", "floor")
    assert r["a"] == pytest.approx([1.1, 121 / math.sqrt(121 * 121)])
    # a drift linear in the log between the neighbours cancels exactly
    assert r["none"] == pytest.approx([100 / math.sqrt(100 * 121)])


def test_a_failed_block_has_no_ratio_and_nothing_else_is_dropped():
    seq = _sequence([("a", 0, None), ("a", 1, 105.0), ("a", 2, 103.0), ("a", 3, 101.0)],
                    [100.0, 100.0, 100.0, 100.0, 100.0])
    r = untraced.neighbour_ratios(seq, "cpu", "write", "together", "floor")
    assert r["a"] == pytest.approx([1.05, 1.03, 1.01])
    s = untraced.summarize(seq, ["a"], PLACE)
    cell = s["cells"]["a"]["write"]["together"]["cpu"]["floor"]
    assert cell["n"] == 3 and cell["ratio"] == pytest.approx(1.03)
    assert cell["ci"] == [pytest.approx(x, abs=1e-4) for x in interval.median_ci([1.05, 1.03, 1.01])]
    assert s["off_blocks"]["write"]["together"]["blocks"] == 5


def test_median_interval_is_exact_and_needs_three_cycles():
    assert interval.median_ci([1.0, 1.1]) is None
    assert interval.median_ci([1.0, -1.0, 1.1]) is None
    lo, hi = interval.median_ci([0.99, 1.0, 1.01, 1.02, 1.03])
    assert 0.99 <= lo <= 1.01 <= hi <= 1.03
    # the same figures always give the same bounds (exact distribution)
    assert interval.median_ci([0.99, 1.0, 1.01, 1.02, 1.03]) == (lo, hi)
    lo, hi = interval.median_ci([1.2] * 12)
    assert lo == hi == 1.2


def test_block_figures_are_per_syscall_floor_and_median():
    rec = {"gen": "syscall_blocks_getppid", "n": 3000, "errors": 0, "chunk_n": 1000,
           "chunk_cpu_ns": [150_000, 130_000, 200_000], "chunk_wall_ns": [151_000, 131_000, 900_000]}
    f = untraced.block_figures(rec)
    assert f["cpu"] == {"floor": 130.0, "median": 150.0}
    assert f["wall"] == {"floor": 131.0, "median": 151.0}


def _phase(at_ratio: float) -> dict:
    cyc = range(6)
    on = [(c, i, v) for i in cyc for c, v in (("none", 100.0), ("agenttrace-monitor", 100 * at_ratio),
                                              ("auditd", 140.0))]
    seq = _sequence(on, [100.0] * (len(on) + 1))
    configs = ["none", "agenttrace-monitor", "auditd"]
    out = untraced.summarize(seq, configs, PLACE)
    out.update({"configs": configs, "placements": PLACE, "orders": [configs] * 6, "design": "d",
                "judged_on": "cpu floor ratio", "blocks": seq})
    return out


def _result(phase: dict | None) -> dict:
    info = {t: {"available": True, "reason": None} for t in ("none", "agenttrace-monitor", "auditd")}
    res = {"tracers": info, "config": {"judge": "cpu"},
           "summary": {"workloads": {"getppid_loop/outside": {
               "none": {"cpu_ratio": 1.0, "cpu_spread": 0.3},
               "agenttrace-monitor": {"cpu_ratio": 1.2, "cpu_ratio_ci": [0.8, 1.4]}}},
               "tracers": {"agenttrace-monitor": {"bpf_programs": ["tracepoint__sched"]}}}}
    if phase is not None:
        res["untraced"] = phase
    return res


def _untraced_goal(res: dict) -> dict:
    return next(g for g in goals.goals(res) if g["id"] == "untraced_syscall_slowdown")


def test_goal_is_judged_on_the_phase_when_it_ran():
    g = _untraced_goal(_result(_phase(1.0)))
    assert g["status"] == "met" and g["value"] == 1.0 and g["judged_by"] == "untraced phase"
    assert g["ci_verdict"] == "met"
    assert "A/A" in g["detail"] and "auditd getppid/apart 1.400x" in g["detail"]
    g = _untraced_goal(_result(_phase(1.05)))
    assert g["status"] == "missed" and g["ci_verdict"] == "missed"
    assert "attaches no syscall-path program" in g["cause"]


def test_goal_falls_back_to_the_rounds_for_results_without_the_phase():
    # older baselines (no "untraced" key) and runs without the phase keep their verdict
    for phase in (None, {"status": "not measured: not selected by --only"}):
        g = _untraced_goal(_result(phase))
        assert g["status"] == "missed" and g["value"] == 1.2 and "judged_by" not in g
        assert "within the no-tracer spread" in g["cause"]


def test_report_section_lists_every_configuration_and_the_design():
    phase = _phase(1.0)
    md = "\n".join(untraced.markdown(phase))
    assert "## Untraced syscalls, alternated" in md and "Design: d" in md
    for c in phase["configs"]:
        assert f"| {c} |" in md
    assert "1.400x [1.40–1.40]" in md
    assert untraced.markdown({}) == []
    assert "not selected" in "\n".join(untraced.markdown({"status": "not measured: not selected by --only"}))


def _need(cond: bool, why: str) -> None:
    if not cond:
        if os.environ.get("AGENTTRACE_REQUIRE_BPF") == "1":
            pytest.fail(f"AGENTTRACE_REQUIRE_BPF=1 but {why}")
        pytest.skip(why)


@pytest.mark.bpf
@pytest.mark.timeout(120)
def test_tiny_phase_through_the_cli_with_auditd(tmp_path):
    """`python -m bench --only untraced` with auditd, as a user runs it: the phase's result
    (blocks alternated off / on, every ratio, the stop edges), its report section, and auditd's
    rule removed afterwards."""
    _need(os.geteuid() == 0, "needs root (cgroups, auditd)")
    _need(shutil.which("gcc") is not None, "gcc not installed")
    _need(shutil.which("auditctl") is not None and shutil.which("auditd") is not None, "auditd not installed")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "bench", "--size", "tiny", "--only", "untraced", "--no-bpf-stats",
                        "--tracers", "none,auditd", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    ph = res["untraced"]
    assert ph["configs"] == ["none", "auditd"] and len(ph["orders"]) == untraced.SIZES["tiny"]["cycles"]
    blocks = ph["blocks"]
    # off, on, off, on, ..., off: every on block has an off block on both sides
    assert [b["config"] is None for b in blocks] == [i % 2 == 0 for i in range(len(blocks))]
    assert all("error" not in b for b in blocks), [b.get("error") for b in blocks]
    for b in blocks:
        for w in untraced.WORKLOADS:
            for pl in ph["placements"]:
                f = b["figures"][w][pl]
                assert f["errors"] == 0 and 0 < f["cpu"]["floor"] <= f["cpu"]["median"]
    # every cycle gives each configuration a ratio (no timing is asserted: auditd's tax against
    # the A/A noise is a figure of the report, bench/profiles/hbench-untraced.md, not a test)
    cycles = untraced.SIZES["tiny"]["cycles"]
    for c in ("none", "auditd"):
        for w in untraced.WORKLOADS:
            for pl in ph["placements"]:
                cell = ph["cells"][c][w][pl]["cpu"]["floor"]
                assert cell["n"] == cycles and cell["ci"][0] <= cell["ratio"] <= cell["ci"][1]
            e = ph["edge"][c][w]["cpu"]["floor"]
            assert e["n"] == cycles and e["ratio"] > 0
    for b in blocks:
        if b["config"]:
            assert b["edge"]["getppid"]["on"]["chunks"] > 0 and b["edge"]["write"]["off"]["chunks"] > 0
    md = (out / "report.md").read_text()
    assert "## Untraced syscalls, alternated" in md and "| auditd |" in md
    # auditd's rule is gone and no process of the phase is left
    rules = subprocess.run(["auditctl", "-l"], capture_output=True, text=True).stdout
    assert "agenttrace-bench" not in rules
    assert not Path(res["agent_cgroup"]["path"]).exists()


def test_stop_edge_takes_the_chunks_wholly_inside_each_window():
    W, M = int(untraced.EDGE_WINDOW_S * 1e9), int(untraced.EDGE_MARGIN_S * 1e9)
    t_a, t_b = 10_000_000_000, 10_400_000_000
    # chunks of 1 ms, alternating getppid (even) and write (odd), from 0.5 s before the stop
    at = list(range(t_a - 500_000_000, t_b + 500_000_000, 1_000_000))
    cpu = [(200_000 if t_a - W <= a < t_a else 100_000) + (1000 if i % 2 else 0) for i, a in enumerate(at)]
    rec = {"chunk_n": 1000, "chunk_at_ns": at, "chunk_cpu_ns": cpu, "chunk_wall_ns": [1_000_000] * len(at)}
    e = untraced.edge_figures(rec, t_a, t_b)
    assert e["stop_ms"] == 400.0
    n_on = sum(1 for a in at if t_a - W <= a and a + 1_000_000 <= t_a)
    n_off = sum(1 for a in at if t_b + M <= a and a + 1_000_000 <= t_b + M + W)
    assert e["getppid"]["on"]["chunks"] + e["write"]["on"]["chunks"] == n_on
    assert e["getppid"]["off"]["chunks"] + e["write"]["off"]["chunks"] == n_off
    assert e["getppid"]["on"]["cpu"]["floor"] == 200.0 and e["getppid"]["off"]["cpu"]["floor"] == 100.0
    assert e["write"]["on"]["cpu"]["floor"] == 201.0 and e["write"]["off"]["cpu"]["median"] == 101.0
    # the chunks of the teardown itself (between the windows) are in neither
    s = untraced.edge_summary([{"config": "a", "edge": e}] * 3 + [{"config": None}])
    assert s["a"]["getppid"]["cpu"]["floor"]["ratio"] == 2.0 and s["a"]["getppid"]["cpu"]["floor"]["n"] == 3


def test_goal_is_judged_on_the_stop_edge_when_the_phase_has_it():
    phase = _phase(1.2)   # the blocks say 1.2x, the edge 1.004x: the edge is judged
    edge = {"on": {"cpu": {"floor": 100.4, "median": 101.0}, "wall": {"floor": 100.4, "median": 101.0}},
            "off": {"cpu": {"floor": 100.0, "median": 100.0}, "wall": {"floor": 100.0, "median": 100.0}}}
    blocks = [{"config": c, "edge": {"getppid": edge, "write": edge}} for c in ("none", "agenttrace-monitor") * 4]
    phase["edge"] = untraced.edge_summary(blocks)
    g = _untraced_goal(_result(phase))
    assert g["status"] == "met" and g["value"] == pytest.approx(1.004)
    assert "stop edge" in g["detail"] and "blocks (on and off a tracer start apart)" in g["detail"]
    assert "1.200x" in g["detail"]
    md = "\n".join(untraced.markdown(phase))
    assert md.index("**Stop edge**") < md.index("**CPU time per syscall, floor")
