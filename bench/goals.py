"""The goals of issue 15 (and the comparisons of issue 7 still tracked) as met / missed / not
measured, each with the figure it was judged on and, when missed, the cause the same run's
figures point at (BPF time, records per operation, start-up phases, profiles), never a guess
written in advance."""
from __future__ import annotations

import statistics

from . import interval

AGENTTRACE = ("agenttrace-monitor", "agenttrace-enforce")
BPFTRACE = ("bpftrace", "bpftrace-syscalls")
STORMS = ("exec_storm", "connect_storm", "refused_storm")
UNTRACED = ("getppid_loop", "write_loop")
PEER_TOLERANCE = 0.02
# What `agenttrace run` loads by default (tracer/kernel/loader.py DEFAULT_FEATURES), for when
# the package cannot be imported (another build under $BENCH_AGENTTRACE).
FALLBACK_DEFAULT = ("proc", "net", "listen", "flow", "dns", "icmp", "sock", "escape")

ZERO_DROP_RATE = 100_000
STORM_MAX = 1.03
UNTRACED_MAX = 1.01
RSS_MAX_MB = 120
STARTUP_MAX_S = 1.0

JUDGE_FIELD = {"cpu": "cpu_ratio", "wall": "ratio"}
SESSION_FIELD = {"cpu": "session_cpu_ns", "wall": "session_elapsed_ns"}
JUDGE_TEXT = {"cpu": "workload CPU time (user + system, children included), median over rounds",
              "wall": "workload wall-clock time, median over rounds"}


def default_features() -> tuple:
    try:
        from agenttrace.kernel.loader import DEFAULT_FEATURES
        return tuple(DEFAULT_FEATURES)
    except ImportError:
        return FALLBACK_DEFAULT


def judge(result) -> str:
    return result.get("config", {}).get("judge", "cpu")


def _cell(result, key, tracer) -> dict:
    return result.get("summary", {}).get("workloads", {}).get(key, {}).get(tracer, {})


def _bpf_source(cell: dict) -> str:
    """Where a cell's BPF figures come from, when not from the runs its ratios come from: the
    stats-on repetitions (BPF_ENABLE_STATS costs the workload; the judged runs go without)."""
    if not cell.get("bpf_stats_runs"):
        return ""
    on = cell.get("stats_cpu_ratio")
    return (" (BPF figure from the sessions' stats-on repetition, ratio from the stats-off ones"
            + (f"; with stats on the workload's CPU was {on:.3f}x" if on else "") + ")")


def _ratio(result, key, tracer, field=None):
    return _cell(result, key, tracer).get(field or JUDGE_FIELD[judge(result)])


def _other(result, key, tracer) -> str:
    other = "wall" if judge(result) == "cpu" else "cpu"
    v = _ratio(result, key, tracer, JUDGE_FIELD[other])
    return f" ({other} {v:.3f}x)" if v is not None else ""


def _ci(result, key, tracer):
    return _cell(result, key, tracer).get(JUDGE_FIELD[judge(result)] + "_ci")


def _with_ci(v: float, ci) -> str:
    return f"{v:.3f}x" + (f" {interval.fmt_ci(ci)}" if ci else "")


def _peer_noise(result, key, t, peer, bound: float) -> str:
    """Whether t's loss to peer on one workload is beyond the noise: the interval of
    median(t) / median(peer) over the same sessions the ratios use, against `bound`."""
    f = SESSION_FIELD[judge(result)]
    ci = interval.ratio_ci(interval.by_round(_cell(result, key, t), f), interval.by_round(_cell(result, key, peer), f))
    if not ci:
        return ""
    where = ("above: beyond this run's noise" if ci[0] > bound else
             "includes it: within this run's noise")
    return f" ({t}/{peer} {interval.fmt_ci(ci)} vs {bound:.3f}, {where})"


def _top_self(result, n: int = 4) -> str:
    prof = (result.get("profile") or {}).get("after") or {}
    top = prof.get("top_self") or []
    if not top:
        return ""
    blind = prof.get("compiled_modules") or []
    native = prof.get("sampling") == "native"
    return ("; py-spy of the exec storm, most self time: "
            + ", ".join(f"{t['function']} {t['pct']}%" for t in top[:n])
            + (f" ({len(blind)} compiled modules are invisible to py-spy: their time is counted on the "
               "Python frame that calls them)" if blind and not native else "")
            + (f" (native stacks: {len(blind)} compiled modules as <module>.so frames, C calls as "
               "their library's; samples holding the GIL only, so time in syscalls that release it "
               "(epoll, write) is not in these shares)" if blind and native else ""))


def goals(result: dict) -> list:
    info = result.get("tracers", {})
    summ = result.get("summary", {"workloads": {}, "tracers": {}})
    wl, tsum = summ.get("workloads", {}), summ.get("tracers", {})
    at = [t for t in AGENTTRACE if info.get(t, {}).get("available")]
    bts = [t for t in BPFTRACE if info.get(t, {}).get("available")]
    why_not = next((info[t]["reason"] for t in AGENTTRACE if t in info and not info[t]["available"]),
                   "agenttrace not among --tracers")
    out = []

    def add(gid, goal, status, value=None, detail="", cause="", issue=15, **more):
        out.append({"id": gid, "issue": issue, "goal": goal, "status": status, "value": value,
                    "detail": detail, "cause": cause if status == "missed" else "", **more})

    def verdict(ok):
        return "met" if ok else "missed"

    # 0. what is measured: the full default probe set, through the CLI's session builder
    g = "the full default probe set is what is measured (`agenttrace run` as shipped)"
    want = default_features()
    loaded = {s["tracer"]: s["started"].get("probes") for s in result.get("sessions", [])
              if s["tracer"] in AGENTTRACE and isinstance(s.get("started"), dict)}
    if loaded:
        missing = {t: sorted(set(want) - set(p or [])) for t, p in loaded.items()}
        bad = {t: m for t, m in missing.items() if m}
        probes = sorted({f for p in loaded.values() for f in (p or [])})
        add("full_probe_set", g, verdict(not bad), ", ".join(probes),
            f"started records list probes {probes}; default set {list(want)}",
            cause="; ".join(f"{t} lacks {', '.join(m)}" for t, m in bad.items()))
    else:
        add("full_probe_set", g, "not measured", detail=why_not if not at else "no started record seen")

    # 1/2. tracer CPU per logged exec / connect against bpftrace's, same run
    for gid, key, what in (("cpu_per_exec", "exec_storm/inside", "exec (everything for one fork+exec+exit)"),
                           ("cpu_per_connect", "connect_storm/inside", "connect")):
        g = f"agenttrace CPU per logged {what} <= bpftrace's, same run"
        a = {t: _cell(result, key, t).get("cpu_per_op_us") for t in at}
        a = {t: v for t, v in a.items() if v is not None}
        b = {t: _cell(result, key, t).get("cpu_per_op_us") for t in bts}
        b = {t: v for t, v in b.items() if v is not None}
        if not a or not b:
            add(gid, g, "not measured", detail=why_not if not at else
                ("bpftrace: " + (info.get("bpftrace", {}).get("reason") or "not among --tracers") if not bts
                 else f"{key} not run"))
            continue
        worst = max(a, key=a.get)
        peer = min(b, key=b.get)   # the cheaper bpftrace configuration is the bar
        detail = (", ".join(f"{t} {v:.2f} us" for t, v in a.items()) + " vs "
                  + ", ".join(f"{t} {v:.2f} us" for t, v in b.items()) + " per operation")
        ca, cb = _cell(result, key, worst), _cell(result, key, peer)
        cause = (f"{worst} spends {a[worst]:.1f} us per operation against {peer}'s {b[peer]:.1f} "
                 f"({a[worst] / b[peer]:.1f}x); it writes {ca.get('events_per_op')} records per operation "
                 f"({ca.get('cpu_per_event_us')} us each) where {peer} prints {cb.get('events_per_op')} line(s) "
                 f"({cb.get('cpu_per_event_us')} us each): the cost is the userspace work per record")
        if ca.get("bpf_ns_per_op") and cb.get("bpf_ns_per_op"):
            cause += (f"; in the kernel (charged to the workload, not to this figure) {ca['bpf_ns_per_op']:.0f} ns "
                      f"of BPF per operation vs {cb['bpf_ns_per_op']:.0f} ns{_bpf_source(ca)}")
        if gid == "cpu_per_exec":
            cause += _top_self(result)
        # the same comparison paired by round (the rounds' sessions ran minutes apart, the machine
        # drifting for both alike): whether this run can tell the gap from its own noise
        pf = "session_tracer_cpu_per_op_us"
        paired = {}
        for t in a:
            num, den = interval.by_round(_cell(result, key, t), pf), interval.by_round(cb, pf)
            common = sorted(k for k in set(num) & set(den) if num[k] is not None and den[k])
            if common:
                # median over rounds / median over rounds: the statistic the interval resamples
                paired[f"{t}/{peer}"] = (statistics.median(num[k] for k in common)
                                         / statistics.median(den[k] for k in common),
                                         interval.ratio_ci(num, den))
        civ, noise = interval.judge_bound(paired, 1.0)
        if paired:
            detail += ("; per round, CPU per operation against " + peer + ": "
                       + ", ".join(f"{k} {_with_ci(v, ci)}" for k, (v, ci) in paired.items()) + f"; {noise}")
            if a[worst] > b[peer]:
                cause = noise + "; " + cause
        wk = f"{worst}/{peer}"
        add(gid, g, verdict(a[worst] <= b[peer]), a[worst], detail, cause,
            ci=list(paired[wk][1]) if wk in paired and paired[wk][1] else None, ci_verdict=civ)

    # 3. zero drops at >= 100,000 events/s sustained, every drop beyond counted exactly
    sweep = result.get("rate_sweep")
    g = f"zero drops at >= {ZERO_DROP_RATE:,} events/s sustained; drops beyond counted exactly"
    if not sweep or "steps" not in sweep:
        add("zero_drop_rate", g, "not measured", detail=(sweep or {}).get("status", "rate sweep not run"))
    else:
        rate = sweep.get("max_zero_drop_rate", 0)
        target = sweep.get("max_zero_drop_target", rate)
        fd = sweep.get("first_dropping")
        steps = [s for s in sweep["steps"] if "error" not in s]
        inexact = [s for s in steps if s.get("unaccounted") not in (0, None)]
        detail = (f"highest sustained zero-drop step {target}/s asked, {rate}/s achieved "
                  f"({sweep.get('sustained_rule', '')}); zero drops over one step up to "
                  f"{sweep.get('max_zero_drop_rate_any', rate)}/s")
        if fd:
            detail += (f"; first dropping step {fd['target_rate']}/s: generated {fd['generated']}, received "
                       f"{fd['received']}, drops of kind {fd.get('drops_of_kind')}, unaccounted {fd['unaccounted']}")
        ok = target >= ZERO_DROP_RATE and not inexact
        cause = ""
        if not ok:
            parts = []
            if inexact:
                parts.append("drops not counted exactly at " + ", ".join(
                    f"{s['target_rate']}/s ({s['unaccounted']} unaccounted)" for s in inexact))
            if sweep.get("limit"):
                parts.append(sweep["limit"])
            # the last step before the dropping one (the result may have been read back from JSON,
            # so steps are told apart by rate, not identity)
            last = next((s for s in reversed(steps)
                         if not fd or s.get("target_rate") != fd.get("target_rate")), None)
            for s in ([fd] if fd else []) + ([last] if last else []):
                if s and s.get("tracer_cores") is not None:
                    per = (s["tracer_cpu_step_ns"] / max(s.get("received") or 1, 1) / 1000
                           if s.get("tracer_cpu_step_ns") else None)
                    parts.append(f"at {s['target_rate']}/s the tracer kept {s['tracer_cores']:.2f} cores busy while the "
                                 f"generator ran" + (f" ({per:.1f} us per record delivered)" if per else "")
                                 + f", catch-up {s.get('catch_up_s')} s after it stopped")
            if fd and not sweep.get("limit"):
                cores = fd.get("tracer_cores")
                load = (result.get("machine", {}).get("loadavg") or [None])[0]
                if cores is not None and cores < 0.8:
                    parts.append(f"the reader fell behind and the ring buffer overflowed while the tracer had only "
                                 f"{cores:.2f} of a core: it was waiting, not computing"
                                 + (f" (load average {load:.1f} on {result['machine'].get('nproc')} CPUs: waiting for "
                                    "a CPU)" if load is not None and load > result["machine"].get("nproc", 2) else
                                    " (its reader's sleep between batches)"))
                else:
                    parts.append("the reader fell behind and the ring buffer overflowed with the tracer on a full "
                                 "core: the userspace work per record bounds the rate at about 1e6 / (us per record) "
                                 "records/s")
            elif not fd and not sweep.get("limit") and target < ZERO_DROP_RATE:
                parts.append("the sweep's steps stop below the goal (size `tiny`?)")
            cause = "; ".join(parts)
        add("zero_drop_rate", g, verdict(ok), target, detail, cause)

    # 4. storms inside agent cgroups in enforce mode, default pack
    g = f"exec and connect storms inside agent cgroups: slowdown <= {STORM_MAX:.2f}x (enforce, default pack)"
    vals = {w: _ratio(result, f"{w}/inside", "agenttrace-enforce") for w in STORMS}
    vals = {k: v for k, v in vals.items() if v is not None}
    if vals:
        worst = max(vals, key=vals.get)
        c, base = _cell(result, f"{worst}/inside", "agenttrace-enforce"), _cell(result, f"{worst}/inside", "none")
        cause = ""
        if vals[worst] > STORM_MAX:
            parts = []
            ops = result.get("config", {}).get("sizes", {}).get(worst)
            if base.get("median_cpu_ns") and c.get("bpf_ns_per_op") is not None and ops:
                per_op = base["median_cpu_ns"] / ops
                parts.append(f"{worst}: the probes' BPF run time is {c['bpf_ns_per_op']:.0f} ns per operation"
                             f"{_bpf_source(c)}, "
                             f"{100 * c['bpf_ns_per_op'] / per_op:.1f}% of the {per_op / 1000:.1f} us an operation "
                             f"costs untraced, against a measured {100 * (vals[worst] - 1):.1f}%")
            spread = base.get("cpu_spread" if judge(result) == "cpu" else "spread")
            if spread is not None:
                parts.append(f"no-tracer spread {100 * spread:.1f}%")
            if c.get("ratio") and c.get("cpu_ratio"):
                parts.append(f"wall {c['ratio']:.3f}x vs CPU {c['cpu_ratio']:.3f}x: on 2 cores the tracer's own "
                             f"CPU ({c.get('cpu_per_op_us')} us per operation) competes with the storm")
            cause = "; ".join(parts)
        cis = {k: _ci(result, f"{k}/inside", "agenttrace-enforce") for k in vals}
        civ, noise = interval.judge_bound({k: (v, cis[k]) for k, v in vals.items()}, STORM_MAX)
        if cause:
            cause = noise + "; " + cause
        add("storm_slowdown_enforce", g, verdict(vals[worst] <= STORM_MAX), vals[worst],
            f"judged on {JUDGE_TEXT[judge(result)]}; "
            + ", ".join(f"{k} {_with_ci(v, cis[k])}{_other(result, k + '/inside', 'agenttrace-enforce')}"
                        for k, v in vals.items()) + f"; {noise}",
            cause, ci=cis[worst], ci_verdict=civ)
    else:
        add("storm_slowdown_enforce", g, "not measured",
            detail=info.get("agenttrace-enforce", {}).get("reason") or why_not)

    # 5. untraced syscalls outside agents: the untraced phase when it ran (bench/untraced.py),
    # else the rounds' loops (older results, or a run without the phase)
    g = f"untraced syscalls outside agent cgroups: slowdown <= {UNTRACED_MAX:.2f}x"
    phase = result.get("untraced") or {}
    from_phase = bool(phase.get("cells")) and any(t in phase["cells"] for t in at)
    vals = {} if from_phase else {f"{t} {w}": _ratio(result, f"{w}/outside", t) for t in at for w in UNTRACED}
    vals = {k: v for k, v in vals.items() if v is not None}
    if from_phase:
        out.append(untraced_goal(phase, [t for t in at if t in phase["cells"]], tsum, g))
    elif vals:
        worst = max(vals, key=vals.get)
        t_w, w_w = worst.split()
        progs = tsum.get(t_w, {}).get("bpf_programs") or []
        sys_tp = [p for p in progs if p.startswith("syscalls__") or p.startswith("sys_")]
        spread = _cell(result, f"{w_w}/outside", "none").get("cpu_spread" if judge(result) == "cpu" else "spread")
        cause = ""
        if vals[worst] > UNTRACED_MAX:
            bpf = _cell(result, f"{w_w}/outside", t_w).get("bpf_ns_per_op")
            cause = (f"{t_w} runs syscall-path programs {sys_tp}: every task pays them" if sys_tp else
                     f"{t_w} attaches no syscall-path program (BPF run time per untraced syscall "
                     f"{bpf if bpf is not None else '?'} ns): the miss is within the no-tracer spread "
                     f"({100 * (spread or 0):.1f}%), not agenttrace")
        cis = {k: _ci(result, k.split()[1] + "/outside", k.split()[0]) for k in vals}
        civ, noise = interval.judge_bound({k: (v, cis[k]) for k, v in vals.items()}, UNTRACED_MAX)
        if cause:
            cause = noise + "; " + cause
        add("untraced_syscall_slowdown", g, verdict(vals[worst] <= UNTRACED_MAX), vals[worst],
            f"judged on {JUDGE_TEXT[judge(result)]}; worst {worst}; "
            + ", ".join(f"{k} {_with_ci(v, cis[k])}{_other(result, k.split()[1] + '/outside', k.split()[0])}"
                        for k, v in vals.items())
            + f"; {noise}" + (f"; BPF programs {progs}" if progs else ""), cause, ci=cis[worst], ci_verdict=civ)
    else:
        add("untraced_syscall_slowdown", g, "not measured", detail=why_not if not at else "workloads not run")

    # 6. peak RSS
    g = f"peak RSS <= {RSS_MAX_MB} MB"
    rs = {t: tsum[t]["rss_hwm_mb_max"] for t in at if tsum.get(t, {}).get("rss_hwm_mb_max")}
    if rs:
        worst = max(rs, key=rs.get)
        end = tsum[worst].get("rss_end_mb_max") or 0
        cause = ""
        if rs[worst] > RSS_MAX_MB:
            cause = (f"{worst} peaks at {rs[worst]} MB but holds {end} MB at stop: the peak is start-up "
                     "(the probes compiled by clang/LLVM inside the process), not the steady state"
                     if rs[worst] - end > 20 else
                     f"{worst} holds {end} MB at stop, near its {rs[worst]} MB peak: steady-state memory "
                     "(interpreter, BCC, tables; see how memory grows below)")
        add("peak_rss", g, verdict(rs[worst] <= RSS_MAX_MB), rs[worst],
            ", ".join(f"{t} {v} MB (at stop {tsum[t].get('rss_end_mb_max')} MB)" for t, v in rs.items()), cause)
    else:
        add("peak_rss", g, "not measured", detail=why_not)

    # 7. start -> started
    g = f"start to `started` <= {STARTUP_MAX_S:g} s with every probe"
    st = {t: tsum[t]["startup_s_max"] for t in at if tsum.get(t, {}).get("startup_s_max") is not None}
    if st:
        worst = max(st, key=st.get)
        inner = [s["started"].get("startup_ms") for s in result.get("sessions", [])
                 if s["tracer"] == worst and isinstance(s.get("started"), dict) and s["started"].get("startup_ms")]
        cause = ""
        if st[worst] > STARTUP_MAX_S:
            cause = f"{worst} took up to {st[worst]} s from launch to `started`"
            if inner:
                ms = max(inner) / 1000
                cause += (f"; {ms:.2f} s of it inside the session's start (compile, load and attach of every "
                          f"probe, maps written; the part of the probes' load not already done while the rules "
                          f"loaded), the other {max(st[worst] - ms, 0):.2f} s interpreter start, "
                          "imports and rule loading before it")
        # what the tracer still did after `started` before it was idle (bench/tracers.py _settle):
        # said beside the goal, so work moved past the record is not hidden by it
        settle = {}
        for s_ in result.get("sessions", []):
            stv = s_.get("started") if isinstance(s_.get("started"), dict) else {}
            if s_.get("tracer") in st and stv.get("settle_s") is not None:
                settle.setdefault(s_["tracer"], []).append((stv["settle_s"], stv.get("settle_cpu_ms") or 0))
        tail = "; after `started`, until idle: " + ", ".join(
            f"{t} max {max(v[0] for v in vs):g} s, {max(v[1] for v in vs):g} ms CPU" for t, vs in sorted(settle.items())) \
            if settle else ""
        # the first start of each configuration before the rounds (harness.first_starts): said,
        # not judged; a compiling start inside the rounds (a cache that could not be written)
        # stays in the figure
        firsts = [f for f in result.get("first_starts") or [] if f.get("startup_s") is not None]
        first = ("; first start of each configuration before the rounds, not counted: " + ", ".join(
            f"{f['tracer']} {f['startup_s']:.3g} s (probe cache {f.get('probe_cache') or 'unknown'})"
            for f in firsts) + "; the rounds' starts are the node's every start after the first on a "
            "kernel, flag set and probe source" + (
                ", and a first one where `agenttrace prepare` filled the cache at install (setup, the "
                "package's postinst): these first starts were cache hits"
                if all(f.get("probe_cache") == "hit" for f in firsts) else "")) if firsts else ""
        add("startup", g, verdict(st[worst] <= STARTUP_MAX_S), st[worst],
            ", ".join(f"{t} median {tsum[t]['startup_s_median']} s, max {tsum[t]['startup_s_max']} s" for t in st)
            + tail + first, cause)
    else:
        add("startup", g, "not measured", detail=why_not)

    # issue 7's comparisons, still tracked
    if sweep and "steps" in sweep:
        lat = (sweep.get("latency_at_half") or {}).get("latency")
        g5 = "p99 syscall-to-line latency <= 20 ms at half the zero-drop rate"
        if lat:
            add("latency_p99", g5, verdict(lat["p99_ms"] <= 20), round(lat["p99_ms"], 3),
                f"at {sweep['latency_at_half'].get('achieved_rate')}/s: p50 {lat['p50_ms']:.3f} ms, "
                f"p99 {lat['p99_ms']:.3f} ms over {lat['n']} events", issue=7)
        else:
            add("latency_p99", g5, "not measured",
                detail=(sweep.get("latency_at_half") or {}).get("error", "no timestamped events"), issue=7)
    else:
        add("latency_p99", "p99 syscall-to-line latency <= 20 ms at half the zero-drop rate", "not measured",
            detail=(sweep or {}).get("status", "rate sweep not run"), issue=7)
    # bound: what agenttrace's figure over the peer's (the no-tracer median cancels) may be
    for gid, peer, goal, cmp, bound in (
        ("vs_auditd", "auditd", "agenttrace slowdown lower than auditd's on every shared workload",
         lambda a, p: a < p, lambda p: 1.0),
        ("vs_bpftrace", "bpftrace",
         f"agenttrace slowdown no worse than bpftrace's on every shared workload (tolerance {PEER_TOLERANCE:+.0%})",
         lambda a, p: a <= p + PEER_TOLERANCE, lambda p: 1 + PEER_TOLERANCE / p)):
        if not at:
            add(gid, goal, "not measured", detail=why_not, issue=7)
            continue
        if not info.get(peer, {}).get("available"):
            add(gid, goal, "not measured", detail=f"{peer}: {info.get(peer, {}).get('reason') or 'not among --tracers'}",
                issue=7)
            continue
        t = "agenttrace-monitor" if "agenttrace-monitor" in at else at[0]
        f = JUDGE_FIELD[judge(result)]
        pairs = {k: (c[t][f], c[peer][f]) for k, c in wl.items()
                 if t in c and peer in c and c[t].get(f) is not None and c[peer].get(f) is not None}
        if not pairs:
            add(gid, goal, "not measured", detail="no workload measured under both", issue=7)
            continue
        lost = {k: v for k, v in pairs.items() if not cmp(*v)}
        add(gid, goal, verdict(not lost), len(pairs) - len(lost),
            f"{t}: {len(pairs) - len(lost)}/{len(pairs)} workloads; "
            + ", ".join(f"{k} {a:.3f}x vs {p:.3f}x" for k, (a, p) in pairs.items()),
            cause="; ".join(f"{k}: {a:.3f}x vs {p:.3f}x" + _peer_noise(result, k, t, peer, bound(p))
                            for k, (a, p) in lost.items()), issue=7)
    return out


def untraced_goal(phase: dict, at: list, tsum: dict, goal: str) -> dict:
    """The untraced-syscall goal judged on the phase's CPU floor ratios (min-of-chunks CPU time per
    syscall, on block / neighbouring off blocks, median over cycles), the worst over agenttrace's
    modes, workloads and placements, with its interval; the A/A (none) and the peers beside it."""
    cells = phase["cells"]
    edge = phase.get("edge") or {}

    def figs(t, clock="cpu", figure="floor"):
        return {f"{t} {w}/{pl}": (c[clock][figure]["ratio"], c[clock][figure].get("ci"))
                for w, pls in (cells.get(t) or {}).items() for pl, c in pls.items()
                if c.get(clock, {}).get(figure, {}).get("ratio") is not None}

    def edge_figs(t, clock="cpu", figure="floor"):
        return {f"{t} {w} (stop edge)": (c[clock][figure]["ratio"], c[clock][figure].get("ci"))
                for w, c in (edge.get(t) or {}).items() if c.get(clock, {}).get(figure, {}).get("ratio") is not None}
    # the stop edge when the phase has it (off and on a fraction of a second apart); the blocks
    # (a tracer start apart) otherwise
    on_edge = any(edge_figs(t) for t in at)
    primary = edge_figs if on_edge else figs
    vals = {k: v for t in at for k, v in primary(t).items()}
    if not vals:
        return {"id": "untraced_syscall_slowdown", "issue": 15, "goal": goal, "status": "not measured",
                "value": None, "detail": "untraced phase: no block measured", "cause": ""}
    worst = max(vals, key=lambda k: vals[k][0])
    civ, noise = interval.judge_bound(vals, UNTRACED_MAX)

    def fmt(d):
        return ", ".join(f"{k} {_with_ci(v, ci)}" for k, (v, ci) in d.items())
    aa = primary("none")
    peers = {k: v for t in cells if t not in at and t != "none" for k, v in primary(t).items()}
    med = {k: v for t in at for k, v in primary(t, "cpu", "median").items()}
    how = ("stop edge: CPU floor per syscall in the 0.15 s before each stop / the 0.15 s after it"
           if on_edge else phase.get("judged_on", "cpu floor ratio"))
    detail = (f"untraced phase ({how}; {len(phase.get('orders') or [])} cycles): "
              f"{fmt(vals)}; {noise}; A/A (no tracer as a configuration, the method's own noise): {fmt(aa) or '-'}"
              + (f"; peers: {fmt(peers)}" if peers else "")
              + f"; median-of-chunks figure (carries intermittent costs): {fmt(med)}")
    if on_edge:
        detail += "; blocks (on and off a tracer start apart): " + fmt({k: v for t in at for k, v in figs(t).items()})
    frz = {f"{t} {w}/{pl}": (c["floor"]["ratio"], c["floor"].get("ci"))
           for t in at for w, pls in ((phase.get("freeze") or {}).get(t) or {}).items() for pl, c in pls.items()
           if c.get("floor", {}).get("ratio") is not None}
    if frz:
        detail += f"; userspace running / frozen (programs attached, pairs ms apart): {fmt(frz)}"
    bpf = {t: (phase.get("bpf") or {}).get(t) for t in at if (phase.get("bpf") or {}).get(t)}
    if bpf:
        detail += "; its BPF programs per syscall made: " + ", ".join(
            f"{t} {o['runs_per_syscall']:.2g} runs ({o['ns_per_syscall']:g} ns)" for t, o in bpf.items())
    cause = ""
    if vals[worst][0] > UNTRACED_MAX:
        t_w = worst.split()[0]
        progs = tsum.get(t_w, {}).get("bpf_programs") or []
        sys_tp = [p for p in progs if p.startswith("syscalls__") or p.startswith("sys_")]
        aa_hi = max((ci[1] for _, ci in aa.values() if ci), default=None)
        cause = noise + "; " + (
            f"{t_w} runs syscall-path programs {sys_tp}: every task pays them" if sys_tp else
            f"{t_w} attaches no syscall-path program" + (f" (BPF programs {progs})" if progs else "")
            + (f", its programs ran {bpf[t_w]['runs_per_syscall']:.2g} times per syscall made" if t_w in bpf else "")
            + (f"; the A/A intervals reach {aa_hi:.3f}: a ratio this far from 1 is within the method's noise"
               if aa_hi is not None and aa_hi >= vals[worst][0] else
               "; beyond the A/A noise: a cost outside the syscall path (the tracer's own wakeups or "
               "cache use on the shared machine) is the candidate"))
    return {"id": "untraced_syscall_slowdown", "issue": 15, "goal": goal,
            "status": "met" if vals[worst][0] <= UNTRACED_MAX else "missed", "value": vals[worst][0],
            "detail": detail, "cause": cause, "ci": vals[worst][1], "ci_verdict": civ, "judged_by": "untraced phase"}
