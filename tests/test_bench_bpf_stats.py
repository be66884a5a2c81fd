"""BPF run-time stats and the judged figures (bench/report.py): the rounds' repetitions run with
BPF_ENABLE_STATS off, as agenttrace ships, and one repetition per session with them on gives the
BPF figures. Synthetic runs: fixed inputs, no timing and no kernel."""
from __future__ import annotations

import statistics

import pytest

from bench import harness, report

WL = [w for w in harness.WORKLOADS if w.name == "refused_storm"]
CELL = "refused_storm/inside"
# workload CPU (ns per operation) with the stats off, and what turning them on multiplies it by
OFF_CPU = {"none": 1000, "agenttrace-enforce": 1030}
ON_FACTOR = {"none": 1.01, "agenttrace-enforce": 1.5}


def _run(t: str, rnd: int, rep: int, n: int, cpu_per_op: float, tracer_us: float, bpf_ns: int | None) -> dict:
    r = {"round": rnd, "rep": rep, "tracer": t, "workload": "refused_storm", "placement": "inside", "n": n,
         "elapsed_ns": round(2 * cpu_per_op * n), "cpu_ns": round(cpu_per_op * n), "errors": 0,
         "expected_events": n, "tracer_cpu_ns": round(tracer_us * 1000 * n),
         "events": n if t != "none" else 0, "seen_expected_kind": n if t != "none" else 0}
    if bpf_ns is not None and t != "none":
        r["bpf"] = {"sock__inet_sock_set_state": {"run_cnt": 11 * n, "run_time_ns": bpf_ns * n}}
    elif bpf_ns is not None:
        r["bpf"] = {}
    return r


def _runs(reps: int = 2, rounds: int = 3) -> list:
    """Per tracer and round: `reps` judged runs, then one stats-on run whose workload CPU, tracer
    CPU (90 vs 30 us per op) and BPF time are all its own; 100 operations each."""
    out = []
    for t in OFF_CPU:
        tracer_us = 30 if t != "none" else 0
        for rnd in range(rounds):
            cpu = OFF_CPU[t] * (1 + 0.02 * rnd)   # the machine drifts between rounds, alike for both
            out += [dict(_run(t, rnd, rep, 100, cpu, tracer_us, None), bpf_stats=False) for rep in range(reps)]
            out.append(dict(_run(t, rnd, reps, 100, cpu * ON_FACTOR[t], 3 * tracer_us, 2000), bpf_stats=True))
    return out


def _legacy(runs: list) -> list:
    """The same runs as a result from before the stats-on repetition wrote them: no `bpf_stats`
    key, and every run carried BPF deltas (the stats were on for the whole run)."""
    out = []
    for r in runs:
        r = {k: v for k, v in r.items() if k != "bpf_stats"}
        if "bpf" not in r:
            r["bpf"] = ({"sock__inet_sock_set_state": {"run_cnt": 11 * r["n"], "run_time_ns": 1500 * r["n"]}}
                        if r["tracer"] != "none" else {})
        out.append(r)
    return out


def _result(runs: list, bpf_stats: bool = True) -> dict:
    tracers = list(OFF_CPU)
    res = {"started_at": "t", "duration_s": 1, "workloads": {}, "latency": {},
           "machine": {"hostname": "h", "nproc": 2, "cpu_model": "c", "kernel": "k", "mem_total_mb": 1,
                       "loadavg": [0, 0, 0]},
           "config": {"judge": "cpu", "sizes": {**harness.SIZES["tiny"], "refused_storm": 100}, "size": "tiny",
                      "rounds": 3, "cpu_time_source": "s", "bpf_stats": bpf_stats},
           "tracers": {t: {"available": True, "reason": None, "description": t, "scope": "-"} for t in tracers},
           "sessions": [], "runs": runs}
    res["summary"] = report.summarize(runs, [], tracers, WL)
    res["goals"] = report.goals(res)
    return res


def test_stats_on_runs_give_only_the_bpf_figures():
    res = _result(_runs())
    at, none = (res["summary"]["workloads"][CELL][t] for t in ("agenttrace-enforce", "none"))
    # the inflated stats-on runs touch none of the figures the goals are judged on
    assert at["session_cpu_ns"] == [103_000, pytest.approx(105_060), pytest.approx(107_120)]
    assert at["median_cpu_ns"] == pytest.approx(105_060) and none["median_cpu_ns"] == pytest.approx(102_000)
    assert at["cpu_ratio"] == 1.03 and at["ratio"] == 1.03
    assert at["cpu_ratio_ci"] == [1.03, 1.03] and at["ratio_ci"] == [1.03, 1.03]
    assert at["rounds"] == 3 and at["cpu_spread"] == pytest.approx(0.039, abs=1e-3)
    # nor the tracer's CPU per operation and per event (30 us judged, 90 us in the stats-on runs)
    assert at["tracer_cpu_ns"] == 3 * 2 * 30_000 * 100
    assert at["cpu_per_op_us"] == 30.0 and at["cpu_per_event_us"] == 30.0
    assert at["session_tracer_cpu_per_op_us"] == [30.0, 30.0, 30.0]
    # the BPF figures come from the stats-on runs alone, per their own operations and events
    # (divided by every run's, they would be a third of this)
    assert at["bpf_ns_per_op"] == 2000.0 and at["bpf_ns_per_event"] == 2000 and at["bpf_runs_per_op"] == 11.0
    assert at["bpf_progs"] == {"sock__inet_sock_set_state": {"run_cnt": 3 * 11 * 100, "run_time_ns": 3 * 2000 * 100}}
    assert at["bpf_stats_runs"] == 3
    # what turning the stats on cost the workload: the stats-on runs' median over the judged median
    on_median = statistics.median(1030 * 1.5 * (1 + 0.02 * rnd) * 100 for rnd in range(3))
    assert at["stats_cpu_ratio"] == round(on_median / at["median_cpu_ns"], 4) == 1.5
    assert none["stats_cpu_ratio"] == 1.01
    # counts of what was seen are over every run
    assert at["runs"] == 9 and at["events"] == 3 * 300 and at["coverage"] == 1.0 and at["events_per_op"] == 1.0


def test_order_effects_see_the_judged_runs_only():
    runs = _runs(reps=1)
    for r in runs:   # one slow stats-on run: in the session's median it would make round 2 stand out
        if r["bpf_stats"] and r["round"] == 2 and r["tracer"] == "agenttrace-enforce":
            r["cpu_ns"] *= 3
    eff = _result(runs)["summary"]["order_effects"]
    assert eff["cells"] == 1
    # the judged runs drift 2% a round for both tracers alike, and that is all there is
    assert eff["by_round_pct"] == {0: pytest.approx(-2.0, abs=0.05), 1: 0.0, 2: pytest.approx(2.0, abs=0.05)}


def test_stats_cpu_ratio_is_shown_in_the_bpf_table_and_the_storm_cause():
    runs = _runs()
    for r in runs:   # enforce misses the storm goal on the judged runs: 1.10x
        if r["tracer"] == "agenttrace-enforce" and not r["bpf_stats"]:
            r["cpu_ns"] = round(r["cpu_ns"] * 1.1 / 1.03)
    res = _result(runs)
    c = res["summary"]["workloads"][CELL]["agenttrace-enforce"]
    md = report.markdown(res, None)
    assert "| BPF ns/op | BPF ns/event | stats on / off CPU | coverage |" in md
    assert f"| {CELL} | agenttrace-enforce | 1.0 | 30.00 | 30.00 | 2000 | 2000 | {c['stats_cpu_ratio']:.3f}x | 1.000 |" in md
    assert "Goals are judged on repetitions with BPF run-time stats (BPF_ENABLE_STATS" in md
    assert "refused_storm +6.2% workload CPU" in md
    g = next(g for g in res["goals"] if g["id"] == "storm_slowdown_enforce")
    assert g["status"] == "missed" and g["value"] == 1.1
    assert ("the probes' BPF run time is 2000 ns per operation (BPF figure from the sessions' stats-on "
            "repetition, ratio from the stats-off ones; with stats on the workload's CPU was") in g["cause"]


def test_no_stats_on_runs_leave_the_bpf_figures_empty():
    runs = [r for r in _runs() if not r["bpf_stats"]]
    res = _result(runs, bpf_stats=False)
    c = res["summary"]["workloads"][CELL]["agenttrace-enforce"]
    assert c["cpu_ratio"] == 1.03 and c["cpu_per_op_us"] == 30.0
    assert c["bpf_ns_per_op"] is None and c["bpf_ns_per_event"] is None and c["bpf_progs"] == {}
    assert c["stats_cpu_ratio"] is None and c["bpf_stats_runs"] == 0
    assert "they were not turned on at all" in report.markdown(res, None)


def test_a_result_from_before_the_stats_on_repetition_summarizes_as_then():
    runs = _legacy(_runs(reps=1))
    res = _result(runs)
    at = res["summary"]["workloads"][CELL]["agenttrace-enforce"]
    # every run counts for everything, the stats-on one included, as the harness then wrote them
    assert at["session_cpu_ns"] == [pytest.approx(1.25 * 1030 * f * 100) for f in (1, 1.02, 1.04)]
    assert at["tracer_cpu_ns"] == 3 * (30_000 + 90_000) * 100
    assert at["cpu_per_op_us"] == 60.0 and at["session_tracer_cpu_per_op_us"] == [60.0, 60.0, 60.0]
    assert at["bpf_ns_per_op"] == 1750.0 and at["bpf_ns_per_event"] == 1750
    assert at["bpf_progs"]["sock__inet_sock_set_state"]["run_cnt"] == 3 * 11 * 200
    assert at["stats_cpu_ratio"] is None and at["bpf_stats_runs"] is None
    # and exactly what the code before the change computed from them (its loop, kept here)
    assert {k: at[k] for k in _OLD} == _old_cell(runs, "agenttrace-enforce")
    g = next(g for g in res["goals"] if g["id"] == "storm_slowdown_enforce")
    assert "stats-on" not in g["cause"] and "stats-on" not in g["detail"]
    assert "were on for every repetition, the judged ones too" in report.markdown(res, None)


_OLD = ("median_elapsed_ns", "median_cpu_ns", "session_cpu_ns", "session_tracer_cpu_per_op_us", "events",
        "tracer_cpu_ns", "cpu_per_event_us", "cpu_per_op_us", "coverage", "bpf_runs_per_op", "bpf_ns_per_event",
        "bpf_ns_per_op", "bpf_progs", "errors")


def _old_cell(runs: list, t: str) -> dict:
    """report.summarize's per-cell figures as they were before the stats-on repetition."""
    rs = [r for r in runs if r["tracer"] == t]
    per_round: dict = {}
    for r in rs:
        reps = per_round.setdefault(r["round"], ([], []))
        reps[0].append(r["elapsed_ns"])
        reps[1].append(r["cpu_ns"])
    per_round = {k: [statistics.median(e), statistics.median(c)] for k, (e, c) in per_round.items()}
    rounds = sorted(per_round)
    n = sum(r["n"] for r in rs)
    events = sum(r.get("events", 0) for r in rs)
    cpu = sum(r["tracer_cpu_ns"] for r in rs)
    expected = sum(r["expected_events"] for r in rs)
    bpf_runs = sum(p["run_cnt"] for r in rs for p in r.get("bpf", {}).values())
    bpf_ns = sum(p["run_time_ns"] for r in rs for p in r.get("bpf", {}).values())
    progs: dict = {}
    for r in rs:
        for name, p in r.get("bpf", {}).items():
            d = progs.setdefault(name, {"run_cnt": 0, "run_time_ns": 0})
            d["run_cnt"] += p["run_cnt"]
            d["run_time_ns"] += p["run_time_ns"]

    def per_op(rnd):
        mine = [r for r in rs if r["round"] == rnd]
        return round(sum(r["tracer_cpu_ns"] for r in mine) / sum(r["n"] for r in mine) / 1000, 3)
    return {"median_elapsed_ns": statistics.median(per_round[k][0] for k in rounds),
            "median_cpu_ns": statistics.median(per_round[k][1] for k in rounds),
            "session_cpu_ns": [per_round[k][1] for k in rounds],
            "session_tracer_cpu_per_op_us": [per_op(k) for k in rounds], "events": events, "tracer_cpu_ns": cpu,
            "cpu_per_event_us": round(cpu / events / 1000, 3), "cpu_per_op_us": round(cpu / n / 1000, 3),
            "coverage": round(sum(r["seen_expected_kind"] for r in rs) / expected, 4),
            "bpf_runs_per_op": round(bpf_runs / n, 3), "bpf_ns_per_event": round(bpf_ns / events),
            "bpf_ns_per_op": round(bpf_ns / n, 3), "bpf_progs": progs, "errors": 0}
