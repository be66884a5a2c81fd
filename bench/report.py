"""From raw runs to medians, ratios, per-event costs, goal verdicts, report.md and a plot."""
from __future__ import annotations

import statistics
from pathlib import Path

from . import interval, order_effects, untraced


def summarize(runs: list, sessions: list, active: list, workloads: list) -> dict:
    """{"workload/placement": {tracer: {...}}} with medians over rounds and ratios to `none`."""
    out: dict = {}
    for wl in workloads:
        for pl in wl.placements:
            key = f"{wl.name}/{pl}"
            cell: dict = {}
            for t in active:
                rs = [r for r in runs if r["tracer"] == t and r["workload"] == wl.name and r["placement"] == pl]
                if rs:
                    cell[t] = _cell(rs)
            base = cell.get("none")
            for t, c in cell.items():
                c["ratio"] = round(c["median_elapsed_ns"] / base["median_elapsed_ns"], 4) if base else None
                # best-of-rounds ratio: less sensitive to a neighbour's burst on a shared node, shown
                # beside the median ratio the goals are judged on
                c["ratio_min"] = round(c["min_elapsed_ns"] / base["min_elapsed_ns"], 4) if base else None
                c["cpu_ratio"] = (round(c["median_cpu_ns"] / base["median_cpu_ns"], 4)
                                  if base and c["median_cpu_ns"] and base["median_cpu_ns"] else None)
                # 95% intervals of both ratios (bench/interval.py); none against itself has none
                ci = bool(base) and t != "none"
                c["ratio_ci"] = _ci(c, base, "session_elapsed_ns") if ci else None
                c["cpu_ratio_ci"] = _ci(c, base, "session_cpu_ns") if ci else None
            out[key] = cell
    per_tracer = {}
    for t in active:
        ss = [s for s in sessions if s["tracer"] == t]
        progs = sorted({p for s in ss for p in s.get("bpf_programs", [])})
        ok = [s for s in ss if s.get("ok")]
        starts = [s["startup_s"] for s in ss if "startup_s" in s]
        rss = [s["rss_hwm_kb"] for s in ss if s.get("rss_hwm_kb")]
        rss_end = [s["rss_end_kb"] for s in ss if s.get("rss_end_kb")]
        drops = [s.get("drops") for s in ss if s.get("drops") is not None]
        per_tracer[t] = {
            "sessions": len(ss), "sessions_ok": len(ok),
            "errors": [s["error"] for s in ss if s.get("error")],
            "startup_s_median": round(statistics.median(starts), 3) if starts else None,
            "startup_s_max": round(max(starts), 3) if starts else None,
            "rss_hwm_mb_max": round(max(rss) / 1024, 1) if rss else None,
            "rss_end_mb_max": round(max(rss_end) / 1024, 1) if rss_end else None,
            "drops_total": sum(drops) if drops else (0 if t == "none" else None),
            "bpf_programs": progs,
        }
    # the drift of a round or a position, as the judged figures saw it
    judged = [r for r in runs if not r.get("bpf_stats")]
    return {"workloads": out, "tracers": per_tracer, "order_effects": order_effects.measure(judged, sessions),
            "intervals": {"level": float(interval.LEVEL), "method": interval.METHOD,
                          "fields": "ratio_ci, cpu_ratio_ci: [low, high] of ratio, cpu_ratio; null with fewer "
                                    f"than {interval.MIN_ROUNDS} rounds with both sessions; session_rounds, "
                                    "session_elapsed_ns, session_cpu_ns, session_tracer_cpu_per_op_us: the "
                                    "per-session figures, by round"}}


def _split_by_stats(rs: list) -> tuple:
    """(judged, bpf) runs of one cell. The judged ones ran with BPF run-time stats off and give
    the time and tracer-CPU figures; the stats-on repetitions give the BPF figures. A result
    from before the stats-on repetition (no `bpf_stats` key, stats held on for the whole run)
    takes both from every run, as it did then."""
    if not any("bpf_stats" in r for r in rs):
        return rs, rs
    return [r for r in rs if not r.get("bpf_stats")] or rs, [r for r in rs if r.get("bpf_stats")]


def _cell(rs: list) -> dict:
    """One tracer's figures on one workload cell. Counts of what was seen (runs, events,
    coverage, errors) are over every run, stats on or off: the tracer saw both."""
    judged, bpf_rs = _split_by_stats(rs)
    # one figure per session: the median of its repetitions, then the median over the
    # sessions. Not the best: the noise here is not only added time. Over the two small
    # runs of 2026-12-02 (2 repetitions, 60 tracer/workload cells each) the variance of
    # log(tracer / none) between rounds was lower with the mean of the repetitions on
    # 45 and 44 of the 60 cells, 24% and 15% lower on average, than with their minimum
    per_round: dict = {}
    for r in judged:
        reps = per_round.setdefault(r["round"], ([], []))
        reps[0].append(r["elapsed_ns"])
        if r.get("cpu_ns") is not None:
            reps[1].append(r["cpu_ns"])
    per_round = {k: [statistics.median(e), statistics.median(c) if c else None]
                 for k, (e, c) in per_round.items()}
    rounds = sorted(per_round)
    el = [per_round[k][0] for k in rounds]
    wcpu = [per_round[k][1] for k in rounds if per_round[k][1] is not None]
    n_all = sum(r["n"] for r in rs)
    events = sum(r.get("events", 0) for r in rs)
    expected = sum(r["expected_events"] for r in rs)
    seen = sum(r.get("seen_expected_kind", 0) for r in rs)
    cpu = sum(r["tracer_cpu_ns"] for r in judged)
    n = sum(r["n"] for r in judged)
    judged_events = sum(r.get("events", 0) for r in judged)
    judged_expected = sum(r["expected_events"] for r in judged)
    median_cpu = statistics.median(wcpu) if wcpu else None
    return {
        "rounds": len(per_round),
        "runs": len(rs),
        "median_elapsed_ns": statistics.median(el),
        "median_cpu_ns": median_cpu,
        # one figure per session, by round: what the intervals resample
        "session_rounds": rounds,
        "session_elapsed_ns": el,
        "session_cpu_ns": [per_round[k][1] for k in rounds],
        # the tracer's CPU per operation in each round (its repetitions pooled), so the
        # CPU-per-event goals can pair agenttrace with bpftrace round by round
        "session_tracer_cpu_per_op_us": [_tracer_cpu_per_op(judged, k) for k in rounds],
        "min_elapsed_ns": min(el),
        "max_elapsed_ns": max(el),
        # (max - min) / median of the rounds: how far apart identical runs fell
        "spread": round((max(el) - min(el)) / statistics.median(el), 3),
        "cpu_spread": round((max(wcpu) - min(wcpu)) / statistics.median(wcpu), 3) if wcpu else None,
        "events": events,
        "events_per_op": round(events / n_all, 3),
        "tracer_cpu_ns": cpu,
        "cpu_per_event_us": round(cpu / judged_events / 1000, 3) if judged_events else None,
        # per operation of the workload (one exec = fork + exec + exit records for
        # agenttrace, one line for bpftrace): what issue 15 compares between tracers
        # (not for bulk_tcp: one connect per run, so its figure is the idle cost of the window)
        "cpu_per_op_us": (round(cpu / n / 1000, 3) if judged_expected and judged_expected >= n else None),
        "coverage": round(seen / expected, 4) if expected else None,
        **_bpf_figures(bpf_rs),
        "bpf_stats_runs": (sum(1 for r in rs if r.get("bpf_stats")) if any("bpf_stats" in r for r in rs) else None),
        "stats_cpu_ratio": _stats_cpu_ratio(rs, median_cpu),
        "errors": sum(r["errors"] for r in rs),
    }


def _bpf_figures(rs: list) -> dict:
    """BPF runs and run time per operation and per event of the runs that had run-time stats
    on, normalised by those runs' own operations and events; None when none had."""
    if not rs:
        return {"bpf_runs_per_op": None, "bpf_ns_per_event": None, "bpf_ns_per_op": None, "bpf_progs": {}}
    n = sum(r["n"] for r in rs)
    events = sum(r.get("events", 0) for r in rs)
    progs: dict = {}
    for r in rs:
        for name, p in r.get("bpf", {}).items():
            d = progs.setdefault(name, {"run_cnt": 0, "run_time_ns": 0})
            d["run_cnt"] += p["run_cnt"]
            d["run_time_ns"] += p["run_time_ns"]
    bpf_runs = sum(p["run_cnt"] for p in progs.values())
    bpf_ns = sum(p["run_time_ns"] for p in progs.values())
    return {"bpf_runs_per_op": round(bpf_runs / n, 3) if bpf_runs else None,
            "bpf_ns_per_event": round(bpf_ns / events) if events and bpf_ns else None,
            "bpf_ns_per_op": round(bpf_ns / n, 3) if bpf_ns else 0.0,
            "bpf_progs": progs}


def _stats_cpu_ratio(rs: list, median_off) -> float | None:
    """Median workload CPU of the stats-on repetitions / the cell's median over sessions of the
    stats-off ones: what the BPF figures' own measurement cost the workload."""
    on = [r["cpu_ns"] for r in rs if r.get("bpf_stats") and r.get("cpu_ns") is not None]
    if not on or not median_off or not any(r.get("bpf_stats") is False for r in rs):
        return None
    return round(statistics.median(on) / median_off, 4)


def _tracer_cpu_per_op(rs: list, rnd) -> float | None:
    """µs of tracer CPU per workload operation over one round's repetitions; None when the round
    did not see every expected record (the figure would be per a part of them)."""
    mine = [r for r in rs if r["round"] == rnd]
    n = sum(r["n"] for r in mine)
    expected = sum(r["expected_events"] for r in mine)
    if not n or not expected or expected < n:
        return None
    return round(sum(r["tracer_cpu_ns"] for r in mine) / n / 1000, 3)


def _ci(cell: dict, base: dict, field: str):
    ci = interval.ratio_ci(interval.by_round(cell, field), interval.by_round(base, field))
    return [round(ci[0], 4), round(ci[1], 4)] if ci else None


from .goals import JUDGE_FIELD, JUDGE_TEXT, goals, judge as _judge  # noqa: E402,F401  (goals: harness API)
from . import growth as _growth  # noqa: E402
from . import backlog as _backlog  # noqa: E402


def _one_line(text, n: int = 160) -> str:
    """An error fit for a table cell: its last non-empty line (compilers put the verdict last)."""
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    line = lines[-1] if lines else ""
    return (line[:n] + "...") if len(line) > n else line.replace("|", "/")


def _fmt_ms(ns):
    return f"{ns / 1e6:.1f} ms" if ns < 10e9 else f"{ns / 1e9:.2f} s"


def before_after(result: dict) -> list:
    """The before build beside the build under test, same run: per-operation CPU, slowdown,
    start-up and memory (empty when no --before build was measured)."""
    info = result.get("tracers", {})
    pairs = [(b, b.replace("before-", "")) for b in info if b.startswith("agenttrace-before-")
             and info[b].get("available") and info.get(b.replace("before-", ""), {}).get("available")]
    if not pairs:
        return []
    cfg = result.get("config", {})
    L = ["## Before and after (same run)", "",
         f"Before: `{cfg.get('before')}`; after: `{cfg.get('after')}`. Tracer CPU per operation (us) and slowdown "
         f"({JUDGE_TEXT[_judge(result)]}).", "",
         "| workload | configuration | CPU/op before | CPU/op after | slowdown before | slowdown after |",
         "| --- | --- | --- | --- | --- | --- |"]
    f = JUDGE_FIELD[_judge(result)]
    for key, cell in result["summary"]["workloads"].items():
        for b, a in pairs:
            cb, ca = cell.get(b, {}), cell.get(a, {})
            if not cb and not ca:
                continue

            def fmt(c, k, suffix=""):
                return "-" if c.get(k) is None else f"{c[k]:.3f}{suffix}" if isinstance(c[k], float) else f"{c[k]}{suffix}"
            L.append(f"| {key} | {a.split('-', 1)[1]} | {fmt(cb, 'cpu_per_op_us')} | {fmt(ca, 'cpu_per_op_us')} | "
                     f"{fmt(cb, f, 'x')} | {fmt(ca, f, 'x')} |")
    ts = result["summary"]["tracers"]
    L.append("")
    for b, a in pairs:
        L.append(f"- {a.split('-', 1)[1]}: start to `started` {ts.get(b, {}).get('startup_s_median')} s before, "
                 f"{ts.get(a, {}).get('startup_s_median')} s after (median); peak RSS "
                 f"{ts.get(b, {}).get('rss_hwm_mb_max')} MB before, {ts.get(a, {}).get('rss_hwm_mb_max')} MB after; "
                 f"RSS at stop {ts.get(b, {}).get('rss_end_mb_max')} / {ts.get(a, {}).get('rss_end_mb_max')} MB")
    L.append("")
    return L


def profile_section(prof) -> list:
    if not prof:
        return []
    L = ["## Profile: the exec storm under py-spy (agenttrace, enforce)", ""]
    if "status" in prof:
        return L + [prof["status"], ""]
    native = any(isinstance(p, dict) and p.get("sampling") == "native" for p in prof.values())
    how = ("at 1000 Hz with native stacks (compiled modules as `<module>.so` frames), counting only "
           "samples that hold the GIL (time in syscalls that release it, epoll and write, is not here)"
           if native else "at 250 Hz (Python frames only)")
    L.append(f"py-spy samples the tracer process {how} during an exec storm in the agent cgroup, in a "
             "session of its own after the measured rounds (sampling slows the profiled process, so its CPU per "
             "exec is for comparing builds, not with the rounds). Self = samples in the function itself; "
             "inclusive = samples with the function on the stack.")
    L.append("")
    for build, p in prof.items():
        if not isinstance(p, dict):
            continue
        L.append(f"### {build}" + (f" (`{p['exe']}`)" if p.get("exe") else ""))
        L.append("")
        if p.get("status"):
            L += [p["status"], ""]
            continue
        if p.get("error"):
            L += [f"Error: {p['error']}", ""]
        if p.get("workloads"):
            L.append(f"Workload: {p['workloads']}; {p.get('events')} lines, {p.get('events_per_exec')} records per "
                     f"exec; tracer CPU {p.get('cpu_us_per_exec')} us per exec under sampling; py-spy samples "
                     f"{p.get('samples', 0)} (raw: `{p.get('raw')}`).")
            L.append("")
        if p.get("top_self"):
            L.append("| self % | function | | inclusive % | function |")
            L.append("| --- | --- | --- | --- | --- |")
            # frames on (nearly) every sample's stack (main, the CLI, the poll loop) say nothing
            incl = [t for t in p["top_inclusive"] if t["pct"] < 95] or p["top_inclusive"]
            for a, b in zip(p["top_self"][:12], incl[:12] + [{"pct": "", "function": ""}] * 12):
                L.append(f"| {a['pct']} | `{a['function']}` | | {b['pct']} | " + (f"`{b['function']}` |" if b['function'] else " |"))
            L.append("")
        if p.get("bpf"):
            L.append("| BPF program | runs | ns/run |")
            L.append("| --- | --- | --- |")
            for name, b in sorted(p["bpf"].items(), key=lambda kv: -kv[1]["run_time_ns"]):
                L.append(f"| {name} | {b['run_cnt']} | {b['run_time_ns'] // max(b['run_cnt'], 1)} |")
            L.append("")
    after, before = prof.get("after") or {}, prof.get("before") or {}
    if after.get("top_self") and before.get("top_self"):
        a = {t["function"]: t["pct"] for t in after["top_self"]}
        b = {t["function"]: t["pct"] for t in before["top_self"]}
        L.append(f"Before → after: tracer CPU per exec under sampling {before.get('cpu_us_per_exec')} → "
                 f"{after.get('cpu_us_per_exec')} us; self share of the functions on top in either: "
                 + ", ".join(f"`{k}` {b.get(k, '-')}% → {a.get(k, '-')}%"
                             for k in list(dict.fromkeys(list(b)[:5] + list(a)[:5]))) + ".")
        L.append("")
    return L


# why the judged repetitions run with the stats off: workload CPU with them on vs off, measured
# before the harness stopped holding them on for the whole run
STATS_EFFECT = ("stats on vs off under agenttrace-enforce, 8 alternated pairs, 2026-12-06, Intel Xeon 2-CPU VM: "
                "refused_storm +6.2% workload CPU (every pair +4.3% to +19.6%), connect_storm +4.2% (noisy), "
                "exec_storm none")


def bpf_stats_note(result: dict) -> str:
    """How BPF run-time stats (BPF_ENABLE_STATS, two clock reads per program run) were used,
    for the report's header: the goals' figures and the BPF tables come from different runs."""
    runs = result.get("runs") or []
    if runs and not any("bpf_stats" in r for r in runs):
        return ("BPF run-time stats (BPF_ENABLE_STATS) were on for every repetition, the judged ones too "
                "(a result from before the stats-on repetition).")
    if not result.get("config", {}).get("bpf_stats"):
        return ("Goals are judged on repetitions with BPF run-time stats (BPF_ENABLE_STATS) off, as agenttrace "
                "ships; they were not turned on at all (`--no-bpf-stats`, or refused), so there are no BPF figures.")
    return ("Goals are judged on repetitions with BPF run-time stats (BPF_ENABLE_STATS, two clock reads per "
            "program run) off, as agenttrace ships; each session adds one repetition per workload and placement "
            "with them on, the only source of the BPF figures, its cost shown as the BPF table's stats on / off "
            f"CPU column ({STATS_EFFECT}).")


def markdown(result: dict, plot_name: str | None) -> str:
    m = result["machine"]
    cfg = result["config"]
    info = result["tracers"]
    summ = result["summary"]
    L = [f"# agenttrace benchmark ({result['started_at']})", ""]
    L.append(f"Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"{m['mem_total_mb']} MB; load average at start {m['loadavg'][0]:.2f}, at end "
             f"{m.get('loadavg_end', [0])[0]:.2f}. Size `{cfg['size']}`, {cfg['rounds']} round(s), "
             f"{cfg.get('reps', 1)} repetition(s) per session"
             + (" (and one with BPF run-time stats on)" if any(r.get("bpf_stats") for r in result.get("runs") or []) else "")
             + f", {result.get('duration_s', 0)} s. A session's figure is "
             f"the {cfg.get('session_figure', 'best')} of its repetitions; ratios divide medians over sessions (configurations in a "
             f"{'Williams' if cfg.get('order', '').startswith('williams') else 'rotated'} order each round"
             f"{', after an untimed warm-up pass' if cfg.get('warmup') else ''}) by the no-tracer median of the "
             f"same run, with a 95% interval over rounds in brackets. {bpf_stats_note(result)}")
    L.append("")
    L.append("## Goals (issue 15)")
    L.append("")
    L.append("| goal | status | figure | detail | cause (when missed) |")
    L.append("| --- | --- | --- | --- | --- |")
    for g in result["goals"]:
        if g.get("issue", 15) != 15:
            continue
        v = "" if g["value"] is None else g["value"]
        L.append(f"| {g['goal']} | **{g['status']}** | {v} | {_one_line(g['detail'], 2000)} | "
                 f"{_one_line(g.get('cause', ''), 2000)} |")
    L.append("")
    rest = [g for g in result["goals"] if g.get("issue", 15) != 15]
    if rest:
        L.append("Also tracked (issue 7):")
        L.append("")
        for g in rest:
            v = "" if g["value"] is None else f" ({g['value']})"
            L.append(f"- {g['goal']}: **{g['status']}**{v}. {_one_line(g['detail'], 2000)}"
                     + (f" Lost: {_one_line(g['cause'], 2000)}." if g.get("cause") else ""))
        L.append("")
    L += before_after(result)
    L += untraced.markdown(result.get("untraced") or {})
    L.append("## Tracers")
    L.append("")
    for t, i in info.items():
        state = "measured" if i["available"] else f"not available: {i['reason']}"
        L.append(f"- **{t}** ({state}): {i['description']}. Scope: {i['scope']}.")
        probes = sorted({f for s in result.get("sessions", []) if s["tracer"] == t
                         for f in (s.get("started") or {}).get("probes") or []})
        if probes:
            L.append(f"  Probes its `started` record lists: {', '.join(probes)}.")
    L.append("")
    active = [t for t in info if info[t]["available"]]
    L.append("## Slowdown versus no tracer")
    L.append("")
    if plot_name:
        L.append(f"![slowdown]({plot_name})")
        L.append("")
    L.append(f"Goals are judged on the {JUDGE_TEXT[_judge(result)]} (`--judge`). Workload CPU time "
             "carries everything a tracer does inside the traced tasks (BPF programs, the syscall slow path, "
             "audit filtering) and hardly moves when a neighbour takes the other core; wall-clock time also "
             "carries waiting and contention, so it is the noisier of the two on a shared node.")
    L.append("")
    others = [t for t in active if t != "none"]
    for title, field, base_field, extra in (
            ("Workload CPU time ratio (95% interval in brackets)", "cpu_ratio", "median_cpu_ns", None),
            ("Wall-clock ratio (95% interval in brackets, best-of-rounds ratio in parentheses)", "ratio",
             "median_elapsed_ns", "ratio_min")):
        L.append(f"**{title}**")
        L.append("")
        spread = "cpu_spread" if field == "cpu_ratio" else "spread"
        L.append("| workload | none (median, spread) | " + " | ".join(others) + " |")
        L.append("| --- | --- |" + " --- |" * len(others))
        for key, cell in summ["workloads"].items():
            base = cell.get("none")
            row = [key, f"{_fmt_ms(base[base_field])}, ±{100 * (base.get(spread) or 0) / 2:.0f}%"
                   if base and base.get(base_field) else "-"]
            for t in others:
                c = cell.get(t)
                if not c or c.get(field) is None:
                    row.append("-")
                else:
                    ci = interval.fmt_ci(c.get(field + "_ci"))
                    row.append(f"{c[field]:.3f}x" + (f" {ci}" if ci else "")
                               + (f" ({c[extra]:.3f}x)" if extra and c.get(extra) else ""))
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    iv = summ.get("intervals") or {}
    if iv:
        L.append(f"Intervals: {iv.get('method')}. An interval that includes a goal's bound means this run "
                 "cannot tell the tracer from the goal; more rounds, or a quieter machine, narrow it.")
        L.append("")
    L += order_effects.markdown(summ.get("order_effects"))
    L.append("## Tracer cost")
    L.append("")
    L.append("CPU per event = on-CPU time of the tracer's processes during the workload and until its "
             "output went quiet, divided by the events it reported. Coverage = events of the workload's "
             "kind reported / operations done (1.0 = saw every exec/connect).")
    L.append("")
    L.append("BPF ns/event = run time of the tracer's BPF programs (BPF_ENABLE_STATS), spent inside the "
             "traced tasks, per reported event, from the sessions' stats-on repetitions alone (per their own "
             "operations and events); CPU/op and CPU/event come from the judged, stats-off ones. Stats on / off "
             "CPU = median workload CPU of the stats-on repetitions / median of the stats-off ones: what "
             "measuring the BPF figures cost the workload.")
    L.append("")
    L.append("| workload | tracer | events/op | CPU/op (us) | CPU/event (us) | BPF ns/op | BPF ns/event | "
             "stats on / off CPU | coverage |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, cell in summ["workloads"].items():
        if not key.endswith("/inside"):
            continue
        for t, c in cell.items():
            if t == "none":
                continue
            cpe = "-" if c["cpu_per_event_us"] is None else f"{c['cpu_per_event_us']:.2f}"
            cov = "-" if c["coverage"] is None else f"{c['coverage']:.3f}"
            bpf = "-" if c.get("bpf_ns_per_event") is None else str(c["bpf_ns_per_event"])
            cpo = "-" if c.get("cpu_per_op_us") is None else f"{c['cpu_per_op_us']:.2f}"
            bpo = "-" if not c.get("bpf_ns_per_op") else f"{c['bpf_ns_per_op']:.0f}"
            son = "-" if c.get("stats_cpu_ratio") is None else f"{c['stats_cpu_ratio']:.3f}x"
            L.append(f"| {key} | {t} | {c['events_per_op']} | {cpo} | {cpe} | {bpo} | {bpf} | {son} | {cov} |")
    L.append("")
    L.append("| tracer | startup median / max (s) | peak RSS (MB) | RSS at stop (MB) | drops | sessions ok |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    for t, s in summ["tracers"].items():
        if t == "none":
            continue
        L.append(f"| {t} | {s['startup_s_median']} / {s['startup_s_max']} | {s['rss_hwm_mb_max']} | "
                 f"{s.get('rss_end_mb_max')} | {s['drops_total']} | {s['sessions_ok']}/{s['sessions']} |")
    errs = [(t, e) for t, s in summ["tracers"].items() for e in s["errors"]]
    if errs:
        L.append("")
        L.append("Session errors: " + "; ".join(f"{t}: {_one_line(e)}" for t, e in errs))
    L.append("")
    lat = {k: v for k, v in result.get("latency", {}).items() if v}
    if lat:
        L.append("## Event-to-line latency during the workloads")
        L.append("")
        L.append("Kernel timestamp of the event to the moment the line arrived in the harness's pipe "
                 "(agenttrace: RFC 3339 `ts` vs wall clock; bpftrace: `nsecs` vs CLOCK_MONOTONIC).")
        L.append("")
        L.append("| tracer / workload | events | p50 (ms) | p99 (ms) | max (ms) |")
        L.append("| --- | --- | --- | --- | --- |")
        for k, v in lat.items():
            L.append(f"| {k.replace('|', ' ')} | {v['n']} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {v['max_ms']:.3f} |")
        L.append("")
    sweep = result.get("rate_sweep")
    L.append("## Zero-drop sweep (agenttrace)")
    L.append("")
    if not sweep or "steps" not in sweep:
        L.append((sweep or {}).get("status", "not run"))
    else:
        L.append(f"Generator: {sweep['generator']}; tracer {sweep['mode']}, one fresh session per step.")
        L.append("")
        L.append("Drops of kind = kernel drops of connect events + sink drops; unaccounted = generated − "
                 "received − drops of kind (0 = every event is either delivered or counted as dropped). "
                 "Catch-up = time from the generator's end to the last line (the backlog it carried).")
        L.append("")
        L.append("| target/s | achieved/s | generated | received | drops (all / of kind) | unaccounted | "
                 "catch-up (s) | p50 / p99 (ms) |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for s in sweep["steps"] + ([sweep["latency_at_half"]] if sweep.get("latency_at_half") else []):
            if "error" in s:
                L.append(f"| {s['target_rate']} | error: {_one_line(s['error'])} | | | | | | |")
                continue
            lat = f"{s['latency']['p50_ms']:.2f} / {s['latency']['p99_ms']:.2f}" if s.get("latency") else "-"
            L.append(f"| {s['target_rate']} | {s['achieved_rate']} | {s['generated']} | {s['received']} | "
                     f"{s['drops_reported']} / {s.get('drops_of_kind')} | {s['unaccounted']} | "
                     f"{s.get('catch_up_s')} | {lat} |")
        L.append("")
        L.append(f"Highest sustained zero-drop rate: {sweep['max_zero_drop_rate']}/s "
                 f"({sweep.get('sustained_rule', '')}); highest with zero drops over one step: "
                 f"{sweep.get('max_zero_drop_rate_any')}/s. " + sweep.get("limit", ""))
    L.append("")
    L += _growth.markdown(result.get("growth"))
    if result.get("backlog") is not None:
        L += _backlog.render(result["backlog"], "##").rstrip("\n").split("\n") + [""]
    L += profile_section(result.get("profile"))
    L.append("## Notes")
    L.append("")
    L.append("- Workloads: " + "; ".join(f"`{k}` {v['what']} (args {v['args']})"
                                          for k, v in result.get("workloads", {}).items()))
    L.append(f"- CPU time: {cfg['cpu_time_source']}. auditd's in-kernel filtering and record building run "
             "in the traced tasks' own syscalls and show up as workload slowdown, not as auditd CPU.")
    L.append("- 'inside' = the generator joined the agent cgroup (a temporary cgroup2 directory the tracer "
             f"watches, {result.get('agent_cgroup', {}).get('path')}) before its timed loop; 'outside' = "
             "the harness's own cgroup.")
    st = [s["settle"] for s in result.get("sessions", []) if s.get("settle")]
    if st:
        L.append(f"- Between sessions (untimed): dirty pages written back and up to 5 s for a 0.2 s spell of "
                 f"≥ 90% idle CPUs; {sum(1 for x in st if x.get('quiet'))} of {len(st)} sessions found it, "
                 f"longest wait {max(x.get('waited_s', 0) for x in st):.1f} s, longest writeback "
                 f"{max(x.get('sync_s', 0) for x in st):.2f} s.")
    L.append("")
    return "\n".join(L)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    wl = result["summary"]["workloads"]
    tr = [t for t in result["tracers"] if result["tracers"][t]["available"] and t != "none"]
    keys = [k for k in wl if any(wl[k].get(t, {}).get("ratio") for t in tr)]
    if not keys or not tr:
        return False
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.1 * len(keys)), 8), sharex=True)
    width = 0.8 / len(tr)
    for ax, field, label in ((axes[0], "cpu_ratio", "workload CPU time / no tracer"),
                             (axes[1], "ratio", "wall-clock time / no tracer")):
        for i, t in enumerate(tr):
            vals = [wl[k].get(t, {}).get(field) or 0 for k in keys]
            cis = [wl[k].get(t, {}).get(field + "_ci") for k in keys]
            # error bars = the 95% interval; a bar without one (too few rounds) gets none
            err = [[max(v - ci[0], 0) if ci else 0 for v, ci in zip(vals, cis)],
                   [max(ci[1] - v, 0) if ci else 0 for v, ci in zip(vals, cis)]]
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=t,
                   yerr=err if any(cis) else None, error_kw={"elinewidth": 0.7, "capsize": 1.5})
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(label + " (median, 95% CI)")
    axes[1].set_xticks([x + width * (len(tr) - 1) / 2 for x in range(len(keys))])
    axes[1].set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
    axes[0].set_title(f"Slowdown per workload ({result['machine']['nproc']} CPUs, kernel "
                      f"{result['machine']['kernel']}, {result['config']['rounds']} rounds)")
    axes[0].legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: dict, out: Path) -> list:
    files = []
    png = out / "slowdown.png"
    if plot(result, png):
        files.append(png)
    gpng = out / "growth.png"
    if _growth.plot(result.get("growth"), gpng):
        files.append(gpng)
    md = out / "report.md"
    md.write_text(markdown(result, png.name if png in files else None))
    files.append(md)
    return files
