"""The benchmark's confidence intervals (bench/interval.py) and what the goals say with them:
fixed inputs, exact bounds, no timing and no kernel."""
from __future__ import annotations

import itertools
import math
import statistics
from fractions import Fraction

import pytest

from bench import harness, interval, report


def _r(*vals) -> dict:
    return dict(enumerate(vals))


def _brute(num: list, den: list, level: float = 0.95) -> tuple:
    """The same percentiles from all n**n ordered resamples of the rounds, the slow way."""
    n = len(num)
    rs = sorted(statistics.median(num[i] for i in pick) / statistics.median(den[i] for i in pick)
                for pick in itertools.product(range(n), repeat=n))
    return rs[math.ceil((1 - level) / 2 * len(rs)) - 1], rs[math.ceil((1 + level) / 2 * len(rs)) - 1]


def test_exact_bootstrap_distribution():
    # a constant denominator leaves the median's own distribution: P(median* = smallest) =
    # P(at least 3 of 5 draws are it) = 181 / 3125
    assert interval.ratio_distribution(((5, 1), (1, 1), (4, 1), (2, 1), (3, 1))) == (
        (1.0, 181), (2.0, 811), (3.0, 1141), (4.0, 811), (5.0, 181))
    # even n: the resample median is the mean of its two middle values
    assert interval.ratio_distribution(((1, 1), (2, 1), (3, 1), (4, 1))) == (
        (1.0, 13), (1.5, 30), (2.0, 55), (2.5, 60), (3.0, 55), (3.5, 30), (4.0, 13))
    for n in range(1, interval.EXACT_MAX + 1):
        assert sum(w for _, w in interval.ratio_distribution(tuple((i + 1, 1) for i in range(n)))) == n ** n


@pytest.mark.parametrize("num, den, want", [
    ([110, 120, 130, 140, 150], [100] * 5, (1.1, 1.5)),
    ([150, 110, 140, 120, 130], [90, 95, 100, 105, 110], (8 / 7, 5 / 3)),
    ([95, 115, 100, 110, 105], [100, 90, 110, 95, 105], (100 / 110, 115 / 90)),
    # the same 5% apart in every round: the round's drift is not noise of the ratio
    ([105, 95, 115, 100, 110], [100, 90, 110, 95, 105], (115 / 110, 95 / 90)),
    ([10, 12, 11, 13], [10, 10, 11, 12], (1.0, 1.2)),
    ([1, 2, 3], [1, 1, 1], (1.0, 3.0)),          # three rounds: the fewest allowed
    ([7] * 5, [2] * 5, (3.5, 3.5)),               # no spread, no width
])
def test_ratio_interval_exact_bounds(num, den, want):
    got = interval.ratio_ci(_r(*num), _r(*den))
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx(_brute(num, den), rel=1e-12)


def test_ratio_interval_pairs_by_round_and_narrower_level_is_inside():
    # round 9 has no no-tracer session: left out, the rest paired by round number
    assert interval.ratio_ci({0: 110, 1: 120, 2: 130, 9: 500}, {2: 100, 1: 100, 0: 100}) == (1.1, 1.3)
    assert interval.ratio_ci(_r(110, 120, 130, 140, 150), _r(*[100] * 5), level=Fraction(1, 2)) == (1.2, 1.4)


def test_ratio_interval_refuses_too_few_rounds_and_a_zero_base():
    assert interval.ratio_ci(_r(1, 2), _r(1, 2, 3)) is None
    assert interval.ratio_ci(_r(1, 2, 3), _r(None, 1, 2)) is None
    assert interval.ratio_ci(_r(1, 2, 3), _r(0, 1, 2)) is None


def test_sampled_bootstrap_past_the_exact_limit_is_reproducible():
    n = interval.EXACT_MAX + 3
    num = [100 + 3 * i for i in range(n)]
    den = [90 + 2 * ((7 * i) % n) for i in range(n)]
    a = interval.ratio_ci(_r(*num), _r(*den))
    interval.ratio_distribution.cache_clear()
    assert interval.ratio_ci(_r(*num), _r(*den)) == a
    point = statistics.median(num) / statistics.median(den)
    assert min(num) / max(den) <= a[0] <= point <= a[1] <= max(num) / min(den)
    pairs = tuple(zip(num, den))
    assert sum(w for _, w in interval.ratio_distribution(pairs)) == interval.SAMPLES


def test_judge_bound_says_when_the_data_cannot_decide():
    v, text = interval.judge_bound({"exec_storm": (1.05, (0.97, 1.26))}, 1.03)
    assert v == "undecided"
    assert text == ("exec_storm 95% CI 0.970–1.260 includes 1.03: not distinguishable from the goal at this "
                    "noise (missed on the point estimate only)")
    v, text = interval.judge_bound({"a": (1.3, (1.1, 1.5)), "b": (1.0, (0.9, 1.1))}, 1.03)
    assert v == "missed" and text.startswith("a 95% CI 1.100–1.500 above 1.03: missed beyond")
    assert "b 95% CI 0.900–1.100 includes 1.03" in text
    assert interval.judge_bound({"a": (1.0, (0.98, 1.03))}, 1.03)[0] == "met"
    # a point that misses is never met, whatever its interval says
    assert interval.judge_bound({"a": (1.04, (0.98, 1.03))}, 1.03)[0] == "undecided"
    # an interval missing on one figure: cannot be met beyond the noise
    v, text = interval.judge_bound({"a": (1.0, (0.98, 1.0)), "b": (1.0, None)}, 1.03)
    assert v == "undecided" and text.endswith("no interval for b")
    assert interval.judge_bound({"a": (1.0, None)}, 1.03)[0] is None
    assert interval.fmt_ci((1.0512, 1.19)) == "[1.05–1.19]" and interval.fmt_ci(None) == ""
    # outwards: a point at its bound stays inside what is printed
    assert interval.fmt_ci((0.937, 1.0013)) == "[0.93–1.01]" and interval.fmt_ci((1.1, 1.5)) == "[1.10–1.50]"


def _runs(cpu: dict) -> list:
    """Runs of the exec storm inside, one per (tracer, round), workload CPU as given."""
    return [{"round": rd, "rep": 0, "tracer": t, "workload": "exec_storm", "placement": "inside", "n": 30,
             "elapsed_ns": 2 * v, "cpu_ns": v, "errors": 0, "expected_events": 30, "tracer_cpu_ns": 0,
             "events": 0, "seen_expected_kind": 0}
            for t, vals in cpu.items() for rd, v in enumerate(vals)]


def _result(cpu: dict) -> dict:
    wls = [w for w in harness.WORKLOADS if w.name == "exec_storm"]
    runs = _runs(cpu)
    res = {"config": {"judge": "cpu", "sizes": harness.SIZES["tiny"]},
           "tracers": {t: {"available": True, "reason": None, "description": t, "scope": "-"} for t in cpu},
           "sessions": [], "runs": runs}
    res["summary"] = report.summarize(runs, [], list(cpu), wls)
    res["goals"] = report.goals(res)
    return res


def test_summary_and_storm_goal_carry_the_interval():
    res = _result({"none": [100, 100, 100, 100, 100], "agenttrace-enforce": [150, 110, 140, 120, 130]})
    cell = res["summary"]["workloads"]["exec_storm/inside"]
    assert cell["agenttrace-enforce"]["cpu_ratio"] == 1.3
    assert cell["agenttrace-enforce"]["cpu_ratio_ci"] == [1.1, 1.5]
    assert cell["agenttrace-enforce"]["ratio_ci"] == [1.1, 1.5]
    assert cell["agenttrace-enforce"]["session_cpu_ns"] == [150, 110, 140, 120, 130]
    assert cell["agenttrace-enforce"]["session_rounds"] == [0, 1, 2, 3, 4]
    assert cell["none"]["cpu_ratio_ci"] is None
    assert res["summary"]["intervals"]["level"] == 0.95
    g = next(g for g in res["goals"] if g["id"] == "storm_slowdown_enforce")
    assert g["status"] == "missed" and g["ci"] == [1.1, 1.5] and g["ci_verdict"] == "missed"
    assert "exec_storm 1.300x [1.10–1.50]" in g["detail"]
    assert g["cause"].startswith("exec_storm 95% CI 1.100–1.500 above 1.03: missed beyond this run's noise")
    md = report.markdown({**res, "started_at": "t", "duration_s": 1, "workloads": {}, "latency": {},
                          "machine": {"hostname": "h", "nproc": 2, "cpu_model": "c", "kernel": "k",
                                      "mem_total_mb": 1, "loadavg": [0, 0, 0]},
                          "config": {**res["config"], "size": "tiny", "rounds": 5, "cpu_time_source": "s"}}, None)
    assert "| 1.300x [1.10–1.50] |" in md


def test_a_missed_point_inside_the_noise_is_missed_and_says_so():
    res = _result({"none": [100, 90, 110, 95, 105], "agenttrace-enforce": [95, 115, 100, 110, 105]})
    g = next(g for g in res["goals"] if g["id"] == "storm_slowdown_enforce")
    assert g["value"] == 1.05
    assert g["status"] == "missed" and g["ci_verdict"] == "undecided"
    assert "includes 1.03: not distinguishable from the goal at this noise" in g["cause"]


def test_one_round_has_no_interval_and_says_why():
    res = _result({"none": [100], "agenttrace-enforce": [120]})
    cell = res["summary"]["workloads"]["exec_storm/inside"]["agenttrace-enforce"]
    assert cell["cpu_ratio_ci"] is None
    g = next(g for g in res["goals"] if g["id"] == "storm_slowdown_enforce")
    assert g["status"] == "missed" and g["ci_verdict"] is None
    assert "no 95% interval (fewer than 3 rounds with both sessions)" in g["detail"]


def test_order_effects_find_a_round_drift_that_pairing_removes():
    from bench import order_effects
    cpu = {"none": [100, 110, 100], "bpftrace": [120, 132, 120]}
    runs = [r for r in _runs(cpu)]
    sessions = [{"tracer": t, "round": rd} for rd, ts in enumerate(
        [("none", "bpftrace"), ("bpftrace", "none"), ("none", "bpftrace")]) for t in ts]
    eff = order_effects.measure(runs, sessions)
    assert eff["by_round_pct"] == {0: 0.0, 1: 10.0, 2: 0.0}
    assert eff["by_position_pct"] == {0: 3.2, 1: 3.2}
    assert eff["pairing_variance_ratio"] == 0.0 and eff["cells"] == 1
    md = "\n".join(order_effects.markdown(eff))
    assert "by round: 0: +0.0%, 1: +10.0%, 2: +0.0%" in md
    # the paired interval of the same figures has no width: the drift is not the tracer's noise
    assert interval.ratio_ci(_r(*cpu["bpftrace"]), _r(*cpu["none"])) == pytest.approx((1.2, 1.2))


def test_a_session_figure_is_the_median_of_its_repetitions():
    runs = _runs({"none": [100, 100, 100]})
    runs += [dict(r, rep=1, cpu_ns=r["cpu_ns"] + 20 * (r["round"] + 1), elapsed_ns=r["elapsed_ns"] + 40)
             for r in runs]
    wls = [w for w in harness.WORKLOADS if w.name == "exec_storm"]
    cell = report.summarize(runs, [], ["none"], wls)["workloads"]["exec_storm/inside"]["none"]
    assert cell["session_cpu_ns"] == [110, 120, 130] and cell["median_cpu_ns"] == 120
    assert cell["session_elapsed_ns"] == [220, 220, 220]


def _cpu_result(per_op_us: dict) -> dict:
    """The exec storm inside, one session per (tracer, round): tracer CPU per exec as given (µs),
    the workload's own CPU alike for every tracer."""
    wls = [w for w in harness.WORKLOADS if w.name == "exec_storm"]
    runs = [{"round": rd, "rep": 0, "tracer": t, "workload": "exec_storm", "placement": "inside", "n": 30,
             "elapsed_ns": 200, "cpu_ns": 100, "errors": 0, "expected_events": 30 if t == "bpftrace" else 60,
             "tracer_cpu_ns": round(us * 30 * 1000), "events": 30 if t == "bpftrace" else 60,
             "seen_expected_kind": 30}
            for t, vals in per_op_us.items() for rd, us in enumerate(vals)]
    runs += [dict(r, tracer="none", tracer_cpu_ns=0, events=0) for r in runs if r["tracer"] == "bpftrace"]
    tracers = ["none", *per_op_us]
    res = {"config": {"judge": "cpu", "sizes": harness.SIZES["tiny"]},
           "tracers": {t: {"available": True, "reason": None, "description": t, "scope": "-"} for t in tracers},
           "sessions": [], "runs": runs}
    res["summary"] = report.summarize(runs, [], tracers, wls)
    res["goals"] = report.goals(res)
    return res


def test_cpu_per_exec_goal_pairs_agenttrace_with_bpftrace_by_round():
    # every round agenttrace above bpftrace, the machine drifting for both: beyond the noise
    res = _cpu_result({"agenttrace-enforce": [40, 44, 38, 46, 42], "bpftrace": [34, 37, 32, 39, 35]})
    cell = res["summary"]["workloads"]["exec_storm/inside"]
    assert cell["agenttrace-enforce"]["session_tracer_cpu_per_op_us"] == [40, 44, 38, 46, 42]
    assert cell["bpftrace"]["session_tracer_cpu_per_op_us"] == [34, 37, 32, 39, 35]
    g = next(g for g in res["goals"] if g["id"] == "cpu_per_exec")
    assert g["status"] == "missed" and g["value"] == 42.0
    want = interval.ratio_ci(_r(40, 44, 38, 46, 42), _r(34, 37, 32, 39, 35))
    assert g["ci"] == list(want) and want[0] > 1
    assert g["ci_verdict"] == "missed"
    assert "per round, CPU per operation against bpftrace: agenttrace-enforce/bpftrace 1.200x [1.17–1.20]" in g["detail"]
    assert g["cause"].startswith("agenttrace-enforce/bpftrace 95% CI") and "missed beyond this run's noise" in g["cause"]


def test_cpu_per_exec_goal_says_when_the_gap_is_inside_the_noise():
    # the pooled figure misses by a little while the rounds cross over: the run cannot tell
    res = _cpu_result({"agenttrace-enforce": [36, 33, 35, 31, 37], "bpftrace": [33, 35, 32, 34, 33]})
    g = next(g for g in res["goals"] if g["id"] == "cpu_per_exec")
    assert g["status"] == "missed" and g["ci_verdict"] == "undecided"
    assert g["ci"][0] < 1 < g["ci"][1]
    assert "includes 1: not distinguishable from the goal at this noise" in g["cause"]
    # met on the point and on every round: met beyond the noise, and no cause
    res = _cpu_result({"agenttrace-enforce": [30, 31, 29, 30, 28], "bpftrace": [33, 35, 32, 34, 33]})
    g = next(g for g in res["goals"] if g["id"] == "cpu_per_exec")
    assert g["status"] == "met" and g["ci_verdict"] == "met" and not g["cause"]
    assert "met beyond this run's noise" in g["detail"]
