"""Systematic effects of when a session ran, measured on the run itself: is a round, or a
position inside a round, faster or slower than the rest for every configuration alike?

Each session's figure (the median of its repetitions) is compared with the median of the same
configuration on the same workload cell, as log(figure / median); the mean of those deviations
over every cell and configuration, grouped by round or by position, is what a drift of the
machine or a first/last-session effect would move. The pairing gain says what the paired
intervals (bench/interval.py) win from it: the variance of log(tracer / none) within rounds
against the sum of the two configurations' own variances (1.0: no round effect; below: rounds
share a drift and pairing removes it)."""
from __future__ import annotations

import math
import statistics


def _sessions(runs: list, field: str) -> dict:
    """(cell, tracer) -> {round: the session's figure}, the median of its repetitions as in
    report.summarize."""
    reps: dict = {}
    for r in runs:
        v = r.get(field)
        if not v or v <= 0:
            continue
        k = (f"{r['workload']}/{r['placement']}", r["tracer"])
        reps.setdefault(k, {}).setdefault(r["round"], []).append(v)
    return {k: {rnd: statistics.median(v) for rnd, v in d.items()} for k, d in reps.items()}


def _positions(sessions: list) -> dict:
    """(tracer, round) -> its position in the round, from the order the sessions ran."""
    seen: dict = {}
    out = {}
    for s in sessions:
        rnd = s.get("round")
        out[(s["tracer"], rnd)] = seen.get(rnd, 0)
        seen[rnd] = seen.get(rnd, 0) + 1
    return out


def _pct(values: list):
    return round(100 * (math.exp(statistics.mean(values)) - 1), 1) if values else None


def measure(runs: list, sessions: list, field: str = "cpu_ns") -> dict:
    best = _sessions(runs, field)
    pos = _positions(sessions)
    by_round: dict = {}
    by_pos: dict = {}
    for (cell, t), d in best.items():
        if len(d) < 2:
            continue
        m = statistics.median(d.values())
        for rnd, v in d.items():
            dev = math.log(v / m)
            by_round.setdefault(rnd, []).append(dev)
            if (t, rnd) in pos:
                by_pos.setdefault(pos[(t, rnd)], []).append(dev)
    paired = unpaired = 0.0
    cells = 0
    for (cell, t), d in best.items():
        base = best.get((cell, "none"))
        if t == "none" or not base:
            continue
        common = sorted(set(d) & set(base))
        if len(common) < 3:
            continue
        lt = [math.log(d[r]) for r in common]
        ln = [math.log(base[r]) for r in common]
        paired += statistics.variance([a - b for a, b in zip(lt, ln)])
        unpaired += statistics.variance(lt) + statistics.variance(ln)
        cells += 1
    return {
        "field": field,
        # percent faster (-) or slower (+) than the configuration's median, averaged
        "by_round_pct": {r: _pct(v) for r, v in sorted(by_round.items())},
        "by_position_pct": {p: _pct(v) for p, v in sorted(by_pos.items())},
        "pairing_variance_ratio": round(paired / unpaired, 3) if cells and unpaired > 0 else None,
        "cells": cells,
    }


def markdown(eff: dict | None) -> list:
    if not eff or not (eff.get("by_round_pct") or eff.get("by_position_pct")):
        return []
    L = ["**Order effects** (workload CPU time of each session against its configuration's median on the "
         "same workload, averaged over every workload and configuration: what a drift of the machine or a "
         "first-session effect moves for all alike)", ""]
    fmt = lambda d: ", ".join(f"{k}: {v:+.1f}%" for k, v in d.items() if v is not None)  # noqa: E731
    if eff.get("by_round_pct"):
        L.append(f"- by round: {fmt(eff['by_round_pct'])}")
    if eff.get("by_position_pct"):
        L.append(f"- by position in the round: {fmt(eff['by_position_pct'])}")
    if eff.get("pairing_variance_ratio") is not None:
        L.append(f"- variance of log(tracer / none) within rounds / unpaired: {eff['pairing_variance_ratio']} "
                 f"over {eff['cells']} cells (below 1: the rounds share a drift, which the paired intervals "
                 "take out)")
    L.append("")
    return L
