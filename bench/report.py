"""From raw runs to medians, ratios, per-event costs, goal verdicts, report.md and a plot."""
from __future__ import annotations

import statistics
from pathlib import Path

# A difference smaller than this between two slowdown ratios is not told apart from noise on
# the 2 shared cores these runs are made on; used only for "no worse than bpftrace".
PEER_TOLERANCE = 0.02
AGENTTRACE = ("agenttrace-monitor", "agenttrace-enforce")
STORMS = ("exec_storm", "connect_storm", "refused_storm")
UNTRACED = ("getppid_loop", "write_loop")


def summarize(runs: list, sessions: list, active: list, workloads: list) -> dict:
    """{"workload/placement": {tracer: {...}}} with medians over rounds and ratios to `none`."""
    out: dict = {}
    for wl in workloads:
        for pl in wl.placements:
            key = f"{wl.name}/{pl}"
            cell: dict = {}
            for t in active:
                rs = [r for r in runs if r["tracer"] == t and r["workload"] == wl.name and r["placement"] == pl]
                if not rs:
                    continue
                # one figure per session: the best of its repetitions (noise on a shared node only
                # ever adds time), then the median over the sessions
                per_round: dict = {}
                for r in rs:
                    best = per_round.setdefault(r["round"], [r["elapsed_ns"], r.get("cpu_ns")])
                    best[0] = min(best[0], r["elapsed_ns"])
                    if r.get("cpu_ns") is not None:
                        best[1] = min(best[1], r["cpu_ns"]) if best[1] is not None else r["cpu_ns"]
                el = [v[0] for v in per_round.values()]
                wcpu = [v[1] for v in per_round.values() if v[1] is not None]
                events = sum(r.get("events", 0) for r in rs)
                cpu = sum(r["tracer_cpu_ns"] for r in rs)
                expected = sum(r["expected_events"] for r in rs)
                seen = sum(r.get("seen_expected_kind", 0) for r in rs)
                bpf_runs = sum(p["run_cnt"] for r in rs for p in r.get("bpf", {}).values())
                bpf_ns = sum(p["run_time_ns"] for r in rs for p in r.get("bpf", {}).values())
                progs: dict = {}
                for r in rs:
                    for name, p in r.get("bpf", {}).items():
                        d = progs.setdefault(name, {"run_cnt": 0, "run_time_ns": 0})
                        d["run_cnt"] += p["run_cnt"]
                        d["run_time_ns"] += p["run_time_ns"]
                cell[t] = {
                    "rounds": len(per_round),
                    "runs": len(rs),
                    "median_elapsed_ns": statistics.median(el),
                    "median_cpu_ns": statistics.median(wcpu) if wcpu else None,
                    "min_elapsed_ns": min(el),
                    "max_elapsed_ns": max(el),
                    # (max - min) / median of the rounds: how far apart identical runs fell
                    "spread": round((max(el) - min(el)) / statistics.median(el), 3),
                    "cpu_spread": round((max(wcpu) - min(wcpu)) / statistics.median(wcpu), 3) if wcpu else None,
                    "events": events,
                    "events_per_op": round(events / sum(r["n"] for r in rs), 3),
                    "tracer_cpu_ns": cpu,
                    "cpu_per_event_us": round(cpu / events / 1000, 3) if events else None,
                    "coverage": round(seen / expected, 4) if expected else None,
                    "bpf_runs_per_op": round(bpf_runs / sum(r["n"] for r in rs), 3) if bpf_runs else None,
                    "bpf_ns_per_event": round(bpf_ns / events) if events and bpf_ns else None,
                    "bpf_ns_per_op": round(bpf_ns / sum(r["n"] for r in rs), 3) if bpf_ns else 0.0,
                    "bpf_progs": progs,
                    "errors": sum(r["errors"] for r in rs),
                }
            base = cell.get("none")
            for t, c in cell.items():
                c["ratio"] = round(c["median_elapsed_ns"] / base["median_elapsed_ns"], 4) if base else None
                # best-of-rounds ratio: less sensitive to a neighbour's burst on a shared node, shown
                # beside the median ratio the goals are judged on
                c["ratio_min"] = round(c["min_elapsed_ns"] / base["min_elapsed_ns"], 4) if base else None
                c["cpu_ratio"] = (round(c["median_cpu_ns"] / base["median_cpu_ns"], 4)
                                  if base and c["median_cpu_ns"] and base["median_cpu_ns"] else None)
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
    return {"workloads": out, "tracers": per_tracer}


JUDGE_FIELD = {"cpu": "cpu_ratio", "wall": "ratio"}
JUDGE_TEXT = {"cpu": "workload CPU time (user + system, children included), median over rounds",
              "wall": "workload wall-clock time, median over rounds"}


def _judge(result) -> str:
    return result.get("config", {}).get("judge", "cpu")


def _ratio(result, key, tracer, field=None):
    field = field or JUDGE_FIELD[_judge(result)]
    return result["summary"]["workloads"].get(key, {}).get(tracer, {}).get(field)


def _other(result, key, tracer) -> str:
    """The ratio on the clock the goals are not judged on, for the detail column."""
    other = "wall" if _judge(result) == "cpu" else "cpu"
    v = _ratio(result, key, tracer, JUDGE_FIELD[other])
    return f" ({other} {v:.3f}x)" if v is not None else ""


def goals(result: dict) -> list:
    """Each goal of issue 7 as met / missed / not measured, with the figure it was judged on."""
    info = result.get("tracers", {})
    summ = result.get("summary", {"workloads": {}, "tracers": {}})
    wl = summ["workloads"]
    at_avail = [t for t in AGENTTRACE if info.get(t, {}).get("available")]
    why_not = next((info[t]["reason"] for t in AGENTTRACE if t in info and not info[t]["available"]),
                   "agenttrace not among --tracers")
    out = []

    def add(gid, goal, status, value=None, detail=""):
        out.append({"id": gid, "goal": goal, "status": status, "value": value, "detail": detail})

    def verdict(ok):
        return "met" if ok else "missed"

    # 1. untraced syscalls
    g = "untraced syscalls outside agent cgroups: slowdown <= 1%"
    vals = {f"{t} {w}": _ratio(result, f"{w}/outside", t) for t in at_avail for w in UNTRACED}
    vals = {k: v for k, v in vals.items() if v is not None}
    if vals:
        worst = max(vals, key=vals.get)
        add("untraced_syscall_slowdown", g, verdict(vals[worst] <= 1.01), vals[worst],
            f"worst: {worst} {vals[worst]:.3f}x; all: "
            + ", ".join(f"{k} {v:.3f}x{_other(result, k.split()[1] + '/outside', k.split()[0])}"
                        for k, v in vals.items()))
    else:
        add("untraced_syscall_slowdown", g, "not measured", detail=why_not if not at_avail else "workloads not run")

    # 2. storms in enforce
    g = "exec and connect storms inside agent cgroups: slowdown <= 5% (enforce, default pack)"
    vals = {w: _ratio(result, f"{w}/inside", "agenttrace-enforce") for w in STORMS}
    vals = {k: v for k, v in vals.items() if v is not None}
    if vals:
        worst = max(vals, key=vals.get)
        add("storm_slowdown_enforce", g, verdict(vals[worst] <= 1.05), vals[worst],
            ", ".join(f"{k} {v:.3f}x{_other(result, k + '/inside', 'agenttrace-enforce')}" for k, v in vals.items()))
    else:
        add("storm_slowdown_enforce", g, "not measured",
            detail=info.get("agenttrace-enforce", {}).get("reason") or why_not)

    # 3. CPU per event
    g = "agenttrace CPU per event <= 10 us (workloads with >= 1000 events)"
    vals = {}
    for t in at_avail:
        for key, cell in wl.items():
            c = cell.get(t, {})
            # only where events dominate the window: with a handful of events (bulk_tcp: one
            # connect) the figure is the tracer's idle cost over the window, not a per-event cost
            if key.endswith("/inside") and c.get("cpu_per_event_us") is not None and c.get("events", 0) >= 1000:
                vals[f"{t} {key}"] = c["cpu_per_event_us"]
    if vals:
        worst = max(vals, key=vals.get)
        add("cpu_per_event", g, verdict(vals[worst] <= 10), vals[worst],
            f"worst {worst}: {vals[worst]:.2f} us; " + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()))
    else:
        add("cpu_per_event", g, "not measured", detail=why_not if not at_avail else "no inside events seen")

    # 4/5. zero drops and latency
    sweep = result.get("rate_sweep")
    g4 = "zero drops at >= 50,000 events/s sustained; drops beyond counted exactly"
    g5 = "p99 syscall-to-line latency <= 20 ms at half the zero-drop rate"
    if not sweep or "steps" not in sweep:
        why = (sweep or {}).get("status", "rate sweep not run")
        add("zero_drop_rate", g4, "not measured", detail=why)
        add("latency_p99", g5, "not measured", detail=why)
    else:
        rate = sweep.get("max_zero_drop_rate", 0)
        target = sweep.get("max_zero_drop_target", rate)
        fd = sweep.get("first_dropping")
        exact = ""
        if fd:
            exact = (f"; first dropping step {fd['target_rate']}/s: generated {fd['generated']}, received "
                     f"{fd['received']}, drops reported {fd['drops_reported']}, unaccounted {fd['unaccounted']}")
        elif sweep.get("limit"):
            exact = "; " + sweep["limit"]
        status = verdict(target >= 50_000)
        if fd and fd.get("unaccounted") not in (0, None):
            status = "missed"
            exact += " (drops not counted exactly)"
        add("zero_drop_rate", g4, status, target,
            f"highest sustained zero-drop step {target}/s asked, {rate}/s achieved (a step counts at its "
            f"target when the paced generator achieved >= 99% of it; {sweep.get('sustained_rule', '')}); highest rate "
            f"with zero drops over one step {sweep.get('max_zero_drop_rate_any', rate)}/s" + exact)
        lat = (sweep.get("latency_at_half") or {}).get("latency")
        if lat:
            add("latency_p99", g5, verdict(lat["p99_ms"] <= 20), round(lat["p99_ms"], 3),
                f"at {sweep['latency_at_half'].get('achieved_rate')}/s: p50 {lat['p50_ms']:.3f} ms, "
                f"p99 {lat['p99_ms']:.3f} ms over {lat['n']} events")
        else:
            add("latency_p99", g5, "not measured",
                detail=(sweep.get("latency_at_half") or {}).get("error", "no timestamped events"))

    # 6/7. startup, RSS
    tsum = summ["tracers"]
    st = {t: tsum[t]["startup_s_max"] for t in at_avail if tsum.get(t, {}).get("startup_s_max") is not None}
    if st:
        worst = max(st.values())
        add("startup", "startup <= 3 s (launch to lifecycle/started)", verdict(worst <= 3), worst,
            ", ".join(f"{t} median {tsum[t]['startup_s_median']} s, max {tsum[t]['startup_s_max']} s" for t in st))
    else:
        add("startup", "startup <= 3 s (launch to lifecycle/started)", "not measured", detail=why_not)
    rs = {t: tsum[t]["rss_hwm_mb_max"] for t in at_avail if tsum.get(t, {}).get("rss_hwm_mb_max")}
    if rs:
        worst = max(rs.values())
        add("peak_rss", "peak RSS <= 150 MB", verdict(worst <= 150), worst,
            ", ".join(f"{t} {v} MB (at stop {tsum[t].get('rss_end_mb_max')} MB)" for t, v in rs.items()))
    else:
        add("peak_rss", "peak RSS <= 150 MB", "not measured", detail=why_not)

    # 8/9. peers
    for gid, peer, goal, cmp in (
        ("vs_auditd", "auditd", "agenttrace slowdown lower than auditd's on every shared workload",
         lambda a, p: a < p),
        ("vs_bpftrace", "bpftrace",
         f"agenttrace slowdown no worse than bpftrace's on every shared workload (tolerance {PEER_TOLERANCE:+.0%})",
         lambda a, p: a <= p + PEER_TOLERANCE)):
        if not at_avail:
            add(gid, goal, "not measured", detail=why_not)
            continue
        if not info.get(peer, {}).get("available"):
            add(gid, goal, "not measured", detail=f"{peer}: {info.get(peer, {}).get('reason') or 'not among --tracers'}")
            continue
        # monitor mode is the like-for-like configuration: the peers only observe and print
        t = "agenttrace-monitor" if "agenttrace-monitor" in at_avail else at_avail[0]
        f = JUDGE_FIELD[_judge(result)]
        pairs = {k: (c[t][f], c[peer][f]) for k, c in wl.items()
                 if t in c and peer in c and c[t].get(f) is not None and c[peer].get(f) is not None}
        if not pairs:
            add(gid, goal, "not measured", detail="no workload measured under both")
            continue
        lost = {k: v for k, v in pairs.items() if not cmp(*v)}
        add(gid, goal, verdict(not lost), len(pairs) - len(lost),
            f"{t}: {len(pairs) - len(lost)}/{len(pairs)} workloads; "
            + ", ".join(f"{k} {a:.3f}x vs {p:.3f}x" for k, (a, p) in pairs.items()))
    sp = "cpu_spread" if _judge(result) == "cpu" else "spread"

    def noise(keys):
        vals = [(k, wl.get(k, {}).get("none", {}).get(sp)) for k in keys]
        vals = [(k, v) for k, v in vals if v is not None]
        return ("; no-tracer spread over sessions (max-min)/median: "
                + ", ".join(f"{k} {100 * v:.1f}%" for k, v in vals)) if vals else ""
    for g in out:
        if g["id"] in ("untraced_syscall_slowdown", "storm_slowdown_enforce", "vs_auditd", "vs_bpftrace") \
                and g["status"] != "not measured":
            g["detail"] = f"judged on {JUDGE_TEXT[_judge(result)]}; " + g["detail"]
        if g["id"] == "untraced_syscall_slowdown" and g["status"] != "not measured":
            g["detail"] += noise([f"{w}/outside" for w in UNTRACED])
            # noise-free evidence beside the ratio: what agenttrace's BPF programs cost per
            # untraced syscall, and whether it hooks the syscall path at all
            for t in at_avail:
                per_op = [f"{w} {wl.get(f'{w}/outside', {}).get(t, {}).get('bpf_ns_per_op', 0)} ns"
                          for w in UNTRACED if t in wl.get(f"{w}/outside", {})]
                progs = summ["tracers"].get(t, {}).get("bpf_programs") or []
                sys_tp = [p for p in progs if p.startswith("syscalls__") or p.startswith("sys_")]
                if progs:
                    g["detail"] += (f"; {t}: BPF run time per untraced syscall " + ", ".join(per_op)
                                    + (f", syscall-path programs {sys_tp}" if sys_tp else
                                       ", no syscall-path program among " + ", ".join(progs)))
        if g["id"] == "storm_slowdown_enforce" and g["status"] != "not measured":
            g["detail"] += noise([f"{w}/inside" for w in STORMS])
    return out


def _one_line(text, n: int = 160) -> str:
    """An error fit for a table cell: its last non-empty line (compilers put the verdict last)."""
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    line = lines[-1] if lines else ""
    return (line[:n] + "...") if len(line) > n else line.replace("|", "/")


def _fmt_ms(ns):
    return f"{ns / 1e6:.1f} ms" if ns < 10e9 else f"{ns / 1e9:.2f} s"


# Why a goal stays missed after the optimisation work of issue 7, from the profiles that work
# was based on (py-spy, BPF run-time stats, bench.ringbuf_wakeup). Printed under the goals
# when that goal is missed in this run, so a report never lists a miss without its cause.
KNOWN_CAUSES = {
    "cpu_per_event": "agenttrace's own CPU is now the Python pipeline: decode, enrich (process "
                     "table, ancestry, scope), rule matching and JSON per event, spread over many small "
                     "functions with no single hot spot (see the profile below). Reader wakeups and BCC's "
                     "per-record ctypes callback, which dominated before, are gone (batched wakeups, mmap "
                     "reader). Below 10 us needs the per-event work out of Python.",
    "storm_slowdown_enforce": "the probes cost 2-3 us of BPF time per event (BPF ns/event below), a "
                              "few percent of an exec or connect; the rest of the measured slowdown was "
                              "not pinned down on a 2-core VM whose no-tracer spread is of the same order.",
    "peak_rss": "the peak is clang/LLVM compiling the probes inside the agenttrace process (BCC); "
                "after load the compiler's heap is trimmed and its library pages given back, which is "
                "the RSS at stop. Lower peaks need compiling out of process or a CO-RE object.",
    "untraced_syscall_slowdown": "agenttrace attaches no syscall-path program by default (see the BPF "
                                 "run time per untraced syscall in the detail): a miss here is the "
                                 "no-tracer spread, not agenttrace.",
}


def markdown(result: dict, plot_name: str | None) -> str:
    m = result["machine"]
    cfg = result["config"]
    info = result["tracers"]
    summ = result["summary"]
    L = [f"# agenttrace benchmark ({result['started_at']})", ""]
    L.append(f"Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"{m['mem_total_mb']} MB; load average at start {m['loadavg'][0]:.2f}, at end "
             f"{m.get('loadavg_end', [0])[0]:.2f}. Size `{cfg['size']}`, {cfg['rounds']} round(s), "
             f"{cfg.get('reps', 1)} repetition(s) per session, {result.get('duration_s', 0)} s. A session's figure is "
             f"the best of its repetitions; ratios divide medians over sessions (configurations rotated each "
             f"round) by the no-tracer median of the same run.")
    L.append("")
    L.append("## Goals (issue 7)")
    L.append("")
    L.append("| goal | status | figure | detail |")
    L.append("| --- | --- | --- | --- |")
    for g in result["goals"]:
        v = "" if g["value"] is None else g["value"]
        L.append(f"| {g['goal']} | **{g['status']}** | {v} | {_one_line(g['detail'], 2000)} |")
    L.append("")
    missed = [g for g in result["goals"] if g["status"] == "missed" and g["id"] in KNOWN_CAUSES]
    if missed:
        L.append("Why these goals are still missed:")
        L.append("")
        for g in missed:
            L.append(f"- {g['goal']}: {KNOWN_CAUSES[g['id']]}")
        L.append("")
    L.append("## Tracers")
    L.append("")
    for t, i in info.items():
        state = "measured" if i["available"] else f"not available: {i['reason']}"
        L.append(f"- **{t}** ({state}): {i['description']}. Scope: {i['scope']}.")
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
            ("Workload CPU time ratio", "cpu_ratio", "median_cpu_ns", None),
            ("Wall-clock ratio (best-of-rounds ratio in brackets)", "ratio", "median_elapsed_ns", "ratio_min")):
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
                    row.append(f"{c[field]:.3f}x" + (f" ({c[extra]:.3f}x)" if extra and c.get(extra) else ""))
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    L.append("## Tracer cost")
    L.append("")
    L.append("CPU per event = on-CPU time of the tracer's processes during the workload and until its "
             "output went quiet, divided by the events it reported. Coverage = events of the workload's "
             "kind reported / operations done (1.0 = saw every exec/connect).")
    L.append("")
    L.append("BPF ns/event = run time of the tracer's BPF programs (BPF_ENABLE_STATS), spent inside the "
             "traced tasks, per reported event.")
    L.append("")
    L.append("| workload | tracer | events/op | CPU/event (us) | BPF ns/event | coverage |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    for key, cell in summ["workloads"].items():
        if not key.endswith("/inside"):
            continue
        for t, c in cell.items():
            if t == "none":
                continue
            cpe = "-" if c["cpu_per_event_us"] is None else f"{c['cpu_per_event_us']:.2f}"
            cov = "-" if c["coverage"] is None else f"{c['coverage']:.3f}"
            bpf = "-" if c.get("bpf_ns_per_event") is None else str(c["bpf_ns_per_event"])
            L.append(f"| {key} | {t} | {c['events_per_op']} | {cpe} | {bpf} | {cov} |")
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
    prof = result.get("profile")
    if prof:
        L.append("## Profile (agenttrace)")
        L.append("")
        if "status" in prof:
            L.append(prof["status"])
        for mode, p in prof.items():
            if not isinstance(p, dict) or mode == "status":
                continue
            L.append(f"### {mode}")
            L.append("")
            if p.get("status"):
                L.append(p["status"])
                L.append("")
                continue
            if p.get("error"):
                L.append(f"Error: {p['error']}")
                L.append("")
            if p.get("workloads"):
                L.append(f"Workloads: {p['workloads']}; {p.get('events')} lines; py-spy samples "
                         f"{p.get('samples', 0)} (raw: `{p.get('raw')}`).")
                L.append("")
            if p.get("top_self"):
                L.append("| self % | function | | inclusive % | function |")
                L.append("| --- | --- | --- | --- | --- |")
                for a, b in zip(p["top_self"][:12], p["top_inclusive"][:12]):
                    L.append(f"| {a['pct']} | `{a['function']}` | | {b['pct']} | `{b['function']}` |")
                L.append("")
            if p.get("bpf"):
                L.append("| BPF program | runs | ns/run |")
                L.append("| --- | --- | --- |")
                for name, b in sorted(p["bpf"].items(), key=lambda kv: -kv[1]["run_time_ns"]):
                    L.append(f"| {name} | {b['run_cnt']} | {b['run_time_ns'] // max(b['run_cnt'], 1)} |")
                L.append("")
    L.append("## Notes")
    L.append("")
    L.append("- Workloads: " + "; ".join(f"`{k}` {v['what']} (args {v['args']})"
                                          for k, v in result.get("workloads", {}).items()))
    L.append(f"- CPU time: {cfg['cpu_time_source']}. auditd's in-kernel filtering and record building run "
             "in the traced tasks' own syscalls and show up as workload slowdown, not as auditd CPU.")
    L.append("- 'inside' = the generator joined the agent cgroup (a temporary cgroup2 directory the tracer "
             f"watches, {result.get('agent_cgroup', {}).get('path')}) before its timed loop; 'outside' = "
             "the harness's own cgroup.")
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
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=t)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(label + " (median)")
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
    md = out / "report.md"
    md.write_text(markdown(result, png.name if files else None))
    files.append(md)
    return files
