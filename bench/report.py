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
                el = [r["elapsed_ns"] for r in rs]
                events = sum(r.get("events", 0) for r in rs)
                cpu = sum(r["tracer_cpu_ns"] for r in rs)
                expected = sum(r["expected_events"] for r in rs)
                seen = sum(r.get("seen_expected_kind", 0) for r in rs)
                cell[t] = {
                    "rounds": len(rs),
                    "median_elapsed_ns": statistics.median(el),
                    "min_elapsed_ns": min(el),
                    "max_elapsed_ns": max(el),
                    "events": events,
                    "events_per_op": round(events / sum(r["n"] for r in rs), 3),
                    "tracer_cpu_ns": cpu,
                    "cpu_per_event_us": round(cpu / events / 1000, 3) if events else None,
                    "coverage": round(seen / expected, 4) if expected else None,
                    "errors": sum(r["errors"] for r in rs),
                }
            base = cell.get("none")
            for t, c in cell.items():
                c["ratio"] = round(c["median_elapsed_ns"] / base["median_elapsed_ns"], 4) if base else None
            out[key] = cell
    per_tracer = {}
    for t in active:
        ss = [s for s in sessions if s["tracer"] == t]
        ok = [s for s in ss if s.get("ok")]
        starts = [s["startup_s"] for s in ss if "startup_s" in s]
        rss = [s["rss_hwm_kb"] for s in ss if s.get("rss_hwm_kb")]
        drops = [s.get("drops") for s in ss if s.get("drops") is not None]
        per_tracer[t] = {
            "sessions": len(ss), "sessions_ok": len(ok),
            "errors": [s["error"] for s in ss if s.get("error")],
            "startup_s_median": round(statistics.median(starts), 3) if starts else None,
            "startup_s_max": round(max(starts), 3) if starts else None,
            "rss_hwm_mb_max": round(max(rss) / 1024, 1) if rss else None,
            "drops_total": sum(drops) if drops else (0 if t == "none" else None),
        }
    return {"workloads": out, "tracers": per_tracer}


def _ratio(result, key, tracer):
    return result["summary"]["workloads"].get(key, {}).get(tracer, {}).get("ratio")


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
            f"worst: {worst} {vals[worst]:.3f}x; all: " + ", ".join(f"{k} {v:.3f}x" for k, v in vals.items()))
    else:
        add("untraced_syscall_slowdown", g, "not measured", detail=why_not if not at_avail else "workloads not run")

    # 2. storms in enforce
    g = "exec and connect storms inside agent cgroups: slowdown <= 5% (enforce, default pack)"
    vals = {w: _ratio(result, f"{w}/inside", "agenttrace-enforce") for w in STORMS}
    vals = {k: v for k, v in vals.items() if v is not None}
    if vals:
        worst = max(vals, key=vals.get)
        add("storm_slowdown_enforce", g, verdict(vals[worst] <= 1.05), vals[worst],
            ", ".join(f"{k} {v:.3f}x" for k, v in vals.items()))
    else:
        add("storm_slowdown_enforce", g, "not measured",
            detail=info.get("agenttrace-enforce", {}).get("reason") or why_not)

    # 3. CPU per event
    g = "agenttrace CPU per event <= 10 us"
    vals = {}
    for t in at_avail:
        for key, cell in wl.items():
            c = cell.get(t, {})
            if key.endswith("/inside") and c.get("cpu_per_event_us") is not None and c.get("events", 0) >= 10:
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
        fd = sweep.get("first_dropping")
        exact = ""
        if fd:
            exact = (f"; first dropping step {fd['target_rate']}/s: generated {fd['generated']}, received "
                     f"{fd['received']}, drops reported {fd['drops_reported']}, unaccounted {fd['unaccounted']}")
        elif sweep.get("limit"):
            exact = "; " + sweep["limit"]
        status = verdict(rate >= 50_000)
        if fd and fd.get("unaccounted") not in (0, None):
            status = "missed"
            exact += " (drops not counted exactly)"
        add("zero_drop_rate", g4, status, rate, f"highest zero-drop achieved rate {rate}/s" + exact)
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
            ", ".join(f"{t} {v} MB" for t, v in rs.items()))
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
        pairs = {k: (c[t]["ratio"], c[peer]["ratio"]) for k, c in wl.items()
                 if t in c and peer in c and c[t]["ratio"] is not None and c[peer]["ratio"] is not None}
        if not pairs:
            add(gid, goal, "not measured", detail="no workload measured under both")
            continue
        lost = {k: v for k, v in pairs.items() if not cmp(*v)}
        add(gid, goal, verdict(not lost), len(pairs) - len(lost),
            f"{t}: {len(pairs) - len(lost)}/{len(pairs)} workloads; "
            + ", ".join(f"{k} {a:.3f}x vs {p:.3f}x" for k, (a, p) in pairs.items()))
    return out


def _fmt_ms(ns):
    return f"{ns / 1e6:.1f} ms" if ns < 10e9 else f"{ns / 1e9:.2f} s"


def markdown(result: dict, plot_name: str | None) -> str:
    m = result["machine"]
    cfg = result["config"]
    info = result["tracers"]
    summ = result["summary"]
    L = [f"# agenttrace benchmark ({result['started_at']})", ""]
    L.append(f"Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"{m['mem_total_mb']} MB; load average at start {m['loadavg'][0]:.2f}, at end "
             f"{m.get('loadavg_end', [0])[0]:.2f}. Size `{cfg['size']}`, {cfg['rounds']} round(s), "
             f"{result.get('duration_s', 0)} s. Medians of the rounds; configurations alternated "
             f"(rotated each round); ratio = median elapsed under the tracer / median with no tracer, same run.")
    L.append("")
    L.append("## Goals (issue 7)")
    L.append("")
    L.append("| goal | status | figure | detail |")
    L.append("| --- | --- | --- | --- |")
    for g in result["goals"]:
        v = "" if g["value"] is None else g["value"]
        L.append(f"| {g['goal']} | **{g['status']}** | {v} | {g['detail']} |")
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
    L.append("| workload | none (median) | " + " | ".join(t for t in active if t != "none") + " |")
    L.append("| --- | --- |" + " --- |" * (len(active) - 1))
    for key, cell in summ["workloads"].items():
        base = cell.get("none")
        row = [key, _fmt_ms(base["median_elapsed_ns"]) if base else "-"]
        for t in active:
            if t == "none":
                continue
            c = cell.get(t)
            row.append(f"{c['ratio']:.3f}x" if c and c.get("ratio") else "-")
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("## Tracer cost")
    L.append("")
    L.append("CPU per event = on-CPU time of the tracer's processes during the workload and until its "
             "output went quiet, divided by the events it reported. Coverage = events of the workload's "
             "kind reported / operations done (1.0 = saw every exec/connect).")
    L.append("")
    L.append("| workload | tracer | events/op | CPU/event (us) | coverage |")
    L.append("| --- | --- | --- | --- | --- |")
    for key, cell in summ["workloads"].items():
        if not key.endswith("/inside"):
            continue
        for t, c in cell.items():
            if t == "none":
                continue
            cpe = "-" if c["cpu_per_event_us"] is None else f"{c['cpu_per_event_us']:.2f}"
            cov = "-" if c["coverage"] is None else f"{c['coverage']:.3f}"
            L.append(f"| {key} | {t} | {c['events_per_op']} | {cpe} | {cov} |")
    L.append("")
    L.append("| tracer | startup median / max (s) | peak RSS (MB) | drops | sessions ok |")
    L.append("| --- | --- | --- | --- | --- |")
    for t, s in summ["tracers"].items():
        if t == "none":
            continue
        L.append(f"| {t} | {s['startup_s_median']} / {s['startup_s_max']} | {s['rss_hwm_mb_max']} | "
                 f"{s['drops_total']} | {s['sessions_ok']}/{s['sessions']} |")
    errs = [(t, e) for t, s in summ["tracers"].items() for e in s["errors"]]
    if errs:
        L.append("")
        L.append("Session errors: " + "; ".join(f"{t}: {e}" for t, e in errs))
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
        L.append("| target/s | achieved/s | generated | received | drops reported | unaccounted | p99 (ms) |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for s in sweep["steps"] + ([sweep["latency_at_half"]] if sweep.get("latency_at_half") else []):
            if "error" in s:
                L.append(f"| {s['target_rate']} | error: {s['error']} | | | | | |")
                continue
            p99 = f"{s['latency']['p99_ms']:.3f}" if s.get("latency") else "-"
            L.append(f"| {s['target_rate']} | {s['achieved_rate']} | {s['generated']} | {s['received']} | "
                     f"{s['drops_reported']} | {s['unaccounted']} | {p99} |")
        L.append("")
        L.append(f"Highest zero-drop rate: {sweep['max_zero_drop_rate']}/s. " + sweep.get("limit", ""))
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
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4.5))
    width = 0.8 / len(tr)
    for i, t in enumerate(tr):
        vals = [wl[k].get(t, {}).get("ratio") or 0 for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], vals, width, label=t)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(tr) - 1) / 2 for x in range(len(keys))])
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("median elapsed / no tracer")
    ax.set_title(f"Slowdown per workload ({result['machine']['nproc']} CPUs, kernel {result['machine']['kernel']})")
    ax.legend(fontsize=8)
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
