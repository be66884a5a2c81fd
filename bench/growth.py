"""How agenttrace's cost grows: CPU per operation and memory against the number of agent
cgroups, rules, allow-list entries and live processes, one fresh `agenttrace run --mode
enforce` session per point (the same CLI and session builder as the measured rounds), each
fitted to flat / log / linear.

Every point is short: the session starts, the state of the point is made (agent cgroups that
have each run a program, sleeping processes in the process table), the storms run `reps`
times (the best counts), the session stops. Tracer CPU is what the tracer's processes spent
during the storm and until its output went quiet, divided by the storm's operations.

BPF run-time stats are off for the points, as agenttrace ships and as in the measured rounds: no
figure of a point reads them (the tracer's CPU is its own processes', the programs run in the
workload's tasks). Until 2026-12-06 the harness held them on for the whole run, so the points'
`*_workload_us_per_op` figures of older results may carry some of their cost (the rounds measured
+4.2% on connect_storm, nothing on exec_storm).
The learned-address series reads BPF run time and turns kernel.bpf_stats_enabled on in its
child for its own length (LEARNED_CHILD)."""
from __future__ import annotations

import atexit
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from . import loadgen, sysinfo, tracers

REPO = Path(__file__).resolve().parent.parent
EXT_DST = "198.18.0.1"   # a benchmarking address (RFC 2544), reached from a netns with no route

# x values per dimension and size; the first point of `rules` is the built-in pack
POINTS = {
    "tiny": {"agents": [1, 10], "rules": [0, 60], "allow_list": [10, 100], "proc_table": [1, 50],
             "exec": 30, "connect": 200, "reps": 1, "rounds": 1},
    "small": {"agents": [1, 100, 1000], "rules": [0, 250, 500], "allow_list": [10, 1000, 10000, 100000],
              "proc_table": [1, 300, 3000], "exec": 400, "connect": 4000, "reps": 2, "rounds": 2},
    "full": {"agents": [1, 10, 100, 1000], "rules": [0, 100, 250, 500],
             "allow_list": [10, 100, 1000, 10000, 100000], "proc_table": [1, 100, 1000, 3000],
             "exec": 2000, "connect": 20000, "reps": 3, "rounds": 3},
}
# the kernel side of the allow-list: addresses learned from DNS answers (bench/egress_storm.py
# fills the `learned` map directly), BPF run time of the connect hook per connect
LEARNED = {"tiny": [10, 1000], "small": [10, 1000, 10000, 100000], "full": [10, 1000, 10000, 100000]}
LEARNED_CHILD = r"""
import json, sys
from pathlib import Path
from bench.egress_storm import one
stats = Path("/proc/sys/kernel/bpf_stats_enabled")
old = stats.read_text().strip()
stats.write_text("1")
try:
    n, learned = int(sys.argv[1]), [int(x) for x in sys.argv[2:]]
    print(json.dumps(one("plain", n, 0, 0)), flush=True)
    for x in learned:
        print(json.dumps(one("allow-list", n, min(x, 10000), x)), flush=True)
finally:
    stats.write_text(old)
"""
DIMENSIONS = {
    "agents": ("agent cgroups watched", "children of the watched cgroup, each of which has run one "
               "program (so the tracer knows it); the storms run in one of them"),
    "rules": ("rules loaded", "the built-in pack, then the pack plus generated rules (a third each: exec "
              "basename, exec path + argv regex, connect port), none of which match the storms"),
    "allow_list": ("allow-list entries", "`NAME:443` entries (distinct names) in one `--allow-egress @FILE`, plus "
                   f"198.18.0.0/15:443; the connect storm goes to {EXT_DST}:443, listed, from a network "
                   "namespace with no route (ENETUNREACH after the hook, no packet). A point the kernel's "
                   "name map cannot hold is refused by agenttrace at start, shown as the point's error; "
                   "the BPF cost of up to 100,000 addresses learned from DNS is `python -m bench.egress_storm`"),
    "proc_table": ("live processes in the agent cgroup", "sleeping processes started in the agent cgroup "
                   "before the storms (each one exec'd, so each is in the process tables)"),
}
METRICS = {"exec_us_per_op": ("tracer CPU per exec (fork+exec+exit), us", "us"),
           "connect_us_per_op": ("tracer CPU per connect, us", "us"),
           "rss_hwm_mb": ("peak RSS, MB", "MB"),
           "rss_end_mb": ("RSS at stop, MB", "MB"),
           "startup_s": ("start to `started`, s", "s")}
# per session, kept with the rounds but not fitted
ROUND_ONLY = ("exec_events_per_op", "connect_events_per_op", "exec_workload_us_per_op", "connect_workload_us_per_op")
# A change across the measured range smaller than this share of the mean is called flat: two
# sessions of the same configuration differ by about this much on a shared 2-core machine.
FLAT_TOLERANCE = 0.10

EXT_CHILD = r"""
import ctypes, errno, os, socket, sys, time
open(sys.argv[1] + "/cgroup.procs", "w").write("0")
if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
    sys.exit("unshare(CLONE_NEWNET) failed")
n = int(sys.argv[2])
c0, t0 = time.process_time_ns(), time.perf_counter_ns()
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((sys.argv[3], 443))
    s.close()
print(time.perf_counter_ns() - t0, time.process_time_ns() - c0)
"""

WARM_CHILD = r"""
import os, sys
for p in sys.argv[1:]:
    with open(p + "/cgroup.procs", "w") as f:
        f.write("0")
    os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0)
"""


# two-sided 95% Student t quantiles by degrees of freedom: the interval of a slope fitted to a
# handful of sessions (no scipy in the bench's environment)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def _t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else (2.0 if df <= 60 else 1.96)


def _lstsq(xs: list, ys: list) -> tuple:
    """y = a + b x by least squares; returns (a, b, r2, se_b), se_b None without a residual df."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(ss_res / (n - 2) / sxx) if n > 2 and sxx else None
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0, se


def fit(xs: list, ys: list, unit: str = "", what: str = "x", tolerance: float = FLAT_TOLERANCE) -> dict:
    """Flat, log or linear, fitted: both y = a + b·x and y = a + b·ln x by least squares over
    every observation (a point measured in several sessions gives several, at one x).

    A trend is called only beyond the scatter: each fit's change over the measured range has a
    95% interval (the slope's Student t interval, n − 2 degrees of freedom); flat when neither
    fit's change exceeds `tolerance` of the mean; linear or log (the better R²) when that fit's
    change exceeds the tolerance and its interval excludes no change; otherwise no clear trend,
    with the interval, so that one outlying session cannot make a growth. With two x values
    and one observation each there is no interval: the direction is said, not the shape."""
    pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and x > 0]
    distinct = sorted({p[0] for p in pts})
    if len(distinct) < 2:
        return {"growth": "not measured", "points": len(distinct), "observations": len(pts),
                "text": f"{len(distinct)} point(s): nothing to fit"}
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mean = sum(ys) / len(ys)
    lin = _lstsq(xs, ys)
    lg = _lstsq([math.log(x) for x in xs], ys)
    width = {"linear": max(xs) - min(xs), "log": math.log(max(xs)) - math.log(min(xs))}
    t = _t95(len(pts) - 2) if len(pts) > 2 else None

    def rel(v):
        return v / abs(mean) if mean else 0.0

    models = {}
    for name, m in (("linear", lin), ("log", lg)):
        d = {"a": m[0], "b": m[1], "r2": round(m[2], 4), "change": round(rel(m[1] * width[name]), 4)}
        if m[3] is not None:
            d["change_ci"] = [round(rel((m[1] - t * m[3]) * width[name]), 4),
                              round(rel((m[1] + t * m[3]) * width[name]), 4)]
        models[name] = d
    change = max(abs(models["linear"]["change"]), abs(models["log"]["change"]))
    out = {"points": len(distinct), "observations": len(pts), "mean": mean, "change_over_range": round(change, 4),
           "linear": models["linear"], "log": models["log"], "tolerance": tolerance}
    rng = f"{min(xs):,} to {max(xs):,} {what}"
    best = "linear" if lin[2] >= lg[2] else "log"
    bm = models[best]

    def ci_text(m):
        ci = m.get("change_ci")
        return f" [95%: {100 * ci[0]:+.0f}% to {100 * ci[1]:+.0f}%]" if ci else ""

    obs = "" if len(pts) == len(distinct) else f", {len(pts)} sessions"
    if change <= tolerance:
        out["growth"] = "flat"
        ci = bm.get("change_ci")
        wide = (f"; the sessions' scatter leaves room for up to {100 * max(map(abs, ci)):.0f}%"
                if ci and max(map(abs, ci)) > tolerance else "")
        out["text"] = (f"flat: {mean:.3g} {unit} on average, the fitted change over {rng} is "
                       f"{100 * change:.1f}% (<= {100 * tolerance:.0f}%){ci_text(bm)}{obs}{wide}")
        return out
    if "change_ci" not in bm:
        lo = [y for x, y in pts if x == distinct[0]][0]
        hi = [y for x, y in pts if x == distinct[-1]][0]
        way = "rises" if hi > lo else "falls"
        out["growth"] = f"{way} (2 points: log or linear)"
        out["text"] = (f"{way}: {lo:.3g} -> {hi:.3g} {unit} over {rng}; two points cannot tell "
                       f"log from linear, nor a trend from a session's scatter")
        return out
    lo, hi = bm["change_ci"]
    if max(lin[2], lg[2]) < 0.5 or lo <= 0 <= hi:
        out["growth"] = "no clear trend"
        why = (f"neither fit explains the points (R² linear {lin[2]:.2f}, log {lg[2]:.2f})"
               if max(lin[2], lg[2]) < 0.5 else
               f"the {best} fit's change over the range, {100 * bm['change']:+.0f}%, has an interval that "
               f"includes none{ci_text(bm)}")
        out["text"] = (f"no clear trend: {why}; {min(ys):.3g} to {max(ys):.3g} {unit} over {rng}{obs}, "
                       "scatter larger than any trend")
        return out
    other = "log" if best == "linear" else "linear"
    if best == "linear":
        per = 10 ** max(0, int(math.floor(math.log10(max(xs)))) - 1)
        out["growth"] = "linear"
        out["text"] = (f"linear: {lin[1] * per:+.3g} {unit} per {per:,} {what} (R² {lin[2]:.2f}; {other} fit "
                       f"R² {lg[2]:.2f}), {100 * bm['change']:+.0f}%{ci_text(bm)} over {rng}{obs}")
    else:
        out["growth"] = "log"
        out["text"] = (f"log: {lg[1] * math.log(10):+.3g} {unit} per tenfold {what} (R² {lg[2]:.2f}; {other} "
                       f"fit R² {lin[2]:.2f}), {100 * bm['change']:+.0f}%{ci_text(bm)} over {rng}{obs}")
    return out


def builtin_rule_count(rules_dir: Path = REPO / "rules") -> int:
    import yaml
    n = 0
    for f in sorted(rules_dir.glob("*.yaml")):
        doc = yaml.safe_load(f.read_text()) or {}
        n += len(doc.get("rules") or [])
    return n


def write_rules(path: Path, n: int) -> Path:
    """n rules that evaluate on every exec/connect of the storms and match none of them."""
    L = ["rules:"]
    for i in range(n):
        head = [f"  - id: bench-generated-{i}", "    description: generated by the benchmark; never matches",
                "    severity: low", "    action: report"]
        if i % 3 == 0:
            L += head + ["    category: exec", "    on: [exec]", "    match:",
                         f"      exe: {{basenames: [bench-tool-{i}]}}"]
        elif i % 3 == 1:
            L += head + ["    category: exec", "    on: [exec]", "    match:", "      exe:",
                         f"        paths: ['/opt/bench-{i}/*']", f"        cmdline_regex: ['--bench-flag-{i}\\b']"]
        else:
            L += head + ["    category: egress", "    on: [connect]", "    match:",
                         f"      dst: {{ports: [{20000 + i}]}}"]
    path.write_text("\n".join(L) + "\n")
    return path


class Point:
    """One configuration: the agenttrace arguments and the state a point needs."""

    def __init__(self, dim: str, x: int, cg: sysinfo.AgentCgroup, work: Path):
        self.dim, self.x, self.cg, self.work = dim, x, cg, work
        self.target = cg.path
        self.args: list = []
        self.label = ""
        self.children: list[Path] = []
        self.sleepers: subprocess.Popen | None = None
        self.workloads = ["exec"]
        if dim == "rules" and x:
            self.args = ["--rules", str(REPO / "rules"), "--rules", str(write_rules(work / f"rules-{x}.yaml", x))]
            self.label = f"--rules rules/ --rules <{x} generated>"
            self.workloads = ["exec", "connect"]
        elif dim == "rules":
            self.workloads = ["exec", "connect"]
        elif dim == "allow_list":
            # as a user gives a long list: one file (`--allow-egress @FILE`), not 100,000 options
            f = work / f"allow-{x}.txt"
            f.write_text("".join(f"n{i}.bench.test:443\n" for i in range(x)) + "198.18.0.0/15:443\n")
            self.args = [f"--allow-egress=@{f}"]
            self.label = f"--allow-egress @<file of {x + 1}>"
            self.workloads = ["exec", "ext_connect"]

    def prepare(self, tracer) -> None:
        """After the session started: agent cgroups that have run a program, or sleepers."""
        if self.dim == "agents":
            self.children = [self.cg.path / f"agent-{i}" for i in range(self.x)]
            for c in self.children:
                c.mkdir()
            m0 = tracer.mark()
            subprocess.run([sys.executable, "-c", WARM_CHILD, *map(str, self.children)], check=True, timeout=300)
            tracer.drain(m0, self.x, timeout=120)
            self.target = self.children[0]
        elif self.dim == "proc_table":
            m0 = tracer.mark()
            script = ('echo 0 > "$1/cgroup.procs"; i=0; while [ $i -lt $2 ]; do sleep 3600 & i=$((i+1)); done; '
                      'echo ready; wait')
            self.sleepers = subprocess.Popen(["/bin/sh", "-c", script, "sh", str(self.cg.path), str(self.x)],
                                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            if self.sleepers.stdout.readline().strip() != b"ready":
                raise loadgen.LoadgenError("sleeper shell did not start its processes")
            tracer.drain(m0, self.x, timeout=120)

    def cleanup(self) -> None:
        if self.sleepers is not None:
            # everything in the agent cgroup now is the sleeper shell and its children, all ours
            for pid in self.cg.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.sleepers.wait(timeout=30)
            self.sleepers.stdout.close()
        from agenttrace.enrich.cgroups import kill_and_remove
        for c in self.children:
            kill_and_remove(c, timeout=10)


def _storm(tracer, gens: dict, kind: str, n: int, target: Path) -> tuple:
    """(tracer CPU ns, operations, workload ns, events) of one storm."""
    m0, c0 = tracer.mark(), tracer.cpu_ns()
    if kind == "ext_connect":
        r = subprocess.run([sys.executable, "-c", EXT_CHILD, str(target), str(n), EXT_DST],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise loadgen.LoadgenError(f"external-connect child: {r.stderr.strip()[-300:]}")
        elapsed = int(r.stdout.split()[0])
        ops = n
    else:
        res = loadgen.run(gens["exec_storm" if kind == "exec" else "connect_storm"], [n], target)
        elapsed, ops = res.elapsed_ns, res.n
    tracer.drain(m0, ops)
    c1, m1 = tracer.cpu_ns(), tracer.mark()
    return c1 - c0, ops, elapsed, m1[1] - m0[1]


class _room_for_args:
    """execve takes argv up to a quarter of the caller's stack limit (8 MiB by default: 2 MiB);
    100,000 --allow-egress arguments need more, so the harness raises its own soft limit while
    it starts the tracer (the child inherits it), and puts it back."""

    def __init__(self, nbytes: int):
        self.need = 4 * nbytes + (8 << 20)
        self.old = None

    def __enter__(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
        if soft != resource.RLIM_INFINITY and soft < self.need:
            self.old = (soft, hard)
            new_hard = hard if hard == resource.RLIM_INFINITY or hard >= self.need else self.need
            resource.setrlimit(resource.RLIMIT_STACK, (self.need, new_hard))
        return self

    def __exit__(self, *exc):
        import resource
        if self.old is not None:
            resource.setrlimit(resource.RLIMIT_STACK, (self.old[0], resource.getrlimit(resource.RLIMIT_STACK)[1]))


def run_point(dim: str, x: int, cg, work: Path, gens: dict, cfg: dict, build: str = "after") -> dict:
    p = Point(dim, x, cg, work)
    tracer = tracers.Agenttrace("enforce", build=build, extra_args=p.args, label=p.label)
    rec: dict = {"dimension": dim, "x": x, "args": p.label}
    if build != "after":
        rec["build"] = build
    if dim == "rules":
        rec["x"] = x + builtin_rule_count() if x else builtin_rule_count()
        rec["generated"] = x
    try:
        rec["settle"] = sysinfo.settle()    # the last session's leftovers are not this start's
        with _room_for_args(sum(len(a) + 9 for a in p.args)):
            tracer.start(cg, work, gens)
        rec["startup_s"] = round(tracer.startup_s, 3)
        rec["probes"] = tracer.started.get("probes")
        p.prepare(tracer)
        for kind in p.workloads:
            n = cfg["connect"] if kind != "exec" else cfg["exec"]
            best = None
            for _ in range(cfg["reps"]):
                cpu, ops, el, ev = _storm(tracer, gens, kind, n, p.target)
                tracer.alive_check()
                if best is None or cpu < best[0]:
                    best = (cpu, ops, el, ev)
            key = "exec" if kind == "exec" else "connect"
            rec[f"{key}_us_per_op"] = round(best[0] / best[1] / 1000, 2)
            rec[f"{key}_events_per_op"] = round(best[3] / best[1], 2)
            rec[f"{key}_workload_us_per_op"] = round(best[2] / best[1] / 1000, 2)
    except (tracers.TracerError, loadgen.LoadgenError, OSError, subprocess.SubprocessError) as e:
        rec["error"] = str(e)[-500:]
    finally:
        if tracer.proc is not None:
            try:
                st = tracer.stop()
                rec["rss_hwm_mb"] = round(st["rss_hwm_kb"] / 1024, 1) if st.get("rss_hwm_kb") else None
                rec["rss_end_mb"] = round(st["rss_end_kb"] / 1024, 1) if st.get("rss_end_kb") else None
                rec["drops"] = st.get("drops")
                if not st.get("stopped_record") and "error" not in rec:
                    rec["error"] = f"no stopped record: {st.get('stderr_tail', '')}"
            except (tracers.TracerError, OSError) as e:
                rec["error"] = (rec.get("error", "") + f"; stop: {e}").lstrip("; ")
        try:
            p.cleanup()
        except (OSError, subprocess.SubprocessError) as e:
            rec["error"] = (rec.get("error", "") + f"; cleanup: {e}").lstrip("; ")
    return rec


def merge_rounds(recs: list) -> dict:
    """One point from its sessions (one per round): CPU per operation the best session's (as
    each session's own figure is the best of its storms), peak and end RSS the highest, start
    the median; every session's figures kept under `rounds`, which the fits use."""
    pt = {k: v for k, v in recs[0].items() if k not in METRICS and k not in ROUND_ONLY and k not in ("error", "drops")}
    pt["rounds"] = [{k: r.get(k) for k in (*METRICS, *ROUND_ONLY) if r.get(k) is not None}
                    | ({"error": r["error"]} if r.get("error") else {}) for r in recs]
    ok = [r for r in recs if not r.get("error")]
    for m in METRICS:
        vals = [r[m] for r in ok if r.get(m) is not None]
        if vals:
            pt[m] = (min(vals) if m.endswith("_per_op") else max(vals) if m.startswith("rss")
                     else sorted(vals)[(len(vals) - 1) // 2])
    for k in ROUND_ONLY:
        vals = [r[k] for r in ok if r.get(k) is not None]
        if vals:
            pt[k] = vals[0] if k.endswith("events_per_op") else min(vals)
    errs = [r["error"] for r in recs if r.get("error")]
    if errs and not ok:
        pt["error"] = errs[0]
    elif errs:
        pt["round_errors"] = errs
    drops = [r.get("drops") for r in recs if r.get("drops") is not None]
    if drops:
        pt["drops"] = drops[0] if len(drops) == 1 else drops
    return pt


def measure(cg, work: Path, gens: dict, size: str, dims: list, log) -> dict:
    """Each point once per round, one fresh session each; the rounds alternate the order of the
    points (1, 10, 100 then 100, 10, 1), so a drift of the machine over the section (a warming
    cache, a neighbour's load) falls on every x alike instead of looking like growth."""
    import time
    cfg = POINTS[size]
    why = tracers.agenttrace_unavailable()
    if why:
        return {"status": f"not measured: {why}"}
    t0 = time.monotonic()
    out: dict = {"config": {k: cfg[k] for k in ("exec", "connect", "reps", "rounds")}, "dimensions": {}}
    for dim in dims:
        by_x: dict = {x: [] for x in cfg[dim]}
        for rnd in range(cfg["rounds"]):
            for x in (cfg[dim] if rnd % 2 == 0 else cfg[dim][::-1]):
                log(f"growth: {dim} = {x} (round {rnd + 1} of {cfg['rounds']})")
                by_x[x].append(run_point(dim, x, cg, work, gens, cfg))
        pts = [merge_rounds(by_x[x]) for x in cfg[dim]]
        out["dimensions"][dim] = {"label": DIMENSIONS[dim][0], "how": DIMENSIONS[dim][1], "points": pts,
                                  "fits": fits(pts, DIMENSIONS[dim][0])}
        if dim == "allow_list":
            log(f"growth: learned addresses {LEARNED[size]} (bench.egress_storm)")
            out["learned"] = learned_series(LEARNED[size], cfg["connect"])
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out


def learned_series(xs: list, n: int) -> dict:
    """The connect hook's BPF run time against addresses learned for the allow-list, by
    bench.egress_storm's sessions (proc + net probes; no packet leaves: a netns with no route)."""
    r = subprocess.run([sys.executable, "-c", LEARNED_CHILD, str(n), *map(str, xs)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    rows = []
    for line in r.stdout.splitlines():
        try:
            rows.append(__import__("json").loads(line))
        except ValueError:
            pass
    res = {"connects": n, "plain": next((x for x in rows if x.get("config") == "plain"), None),
           "points": [x for x in rows if x.get("config") == "allow-list"]}
    if r.returncode != 0:
        res["error"] = r.stderr.strip()[-400:]
    ok = [p for p in res["points"] if p.get("bpf_ns_per_connect")]
    if len(ok) >= 2:
        res["fit"] = fit([p["learned"] for p in ok], [p["bpf_ns_per_connect"] for p in ok], "ns",
                         "learned addresses")
    return res


def fits(pts: list, what: str) -> dict:
    """Every session's figure is an observation (a point's `rounds`; a point without them is one)."""
    ok = [p for p in pts if "error" not in p]
    res = {}
    for m, (_, unit) in METRICS.items():
        xs, ys = [], []
        for p in ok:
            obs = [r[m] for r in p.get("rounds") or [p] if r.get(m) is not None and not r.get("error")]
            xs += [p["x"]] * len(obs)
            ys += obs
        if len(set(xs)) >= 2:
            res[m] = fit(xs, ys, unit, what)
    return res


def markdown(g: dict | None) -> list:
    L = ["## How cost grows", ""]
    if not g:
        return L + ["not run (`--only` without `growth`)", ""]
    if "status" in g:
        return L + [g["status"], ""]
    c = g["config"]
    rounds = c.get("rounds", 1)
    L.append(f"One fresh `agenttrace run --mode enforce` (every default probe) per point and round ({rounds} "
             f"round(s), the order of the points reversed every other round, so that a drift of the machine "
             f"does not read as growth); storms of {c['exec']} execs and {c['connect']} connects inside the agent "
             f"cgroup, best of {c['reps']} per session; tracer CPU per operation = its processes' CPU time during "
             "the storm ÷ operations. A point's CPU is its best session's, its RSS the highest, its start the "
             "median; in brackets the sessions' range. Growth: least-squares fits of y = a + b·x and "
             "y = a + b·ln x over every session's figure; flat when neither changes y by more than "
             f"{100 * FLAT_TOLERANCE:.0f}% of its mean over the range; a trend (the better fit) only when its "
             "change exceeds that and its 95% interval (Student t, slope) excludes no change; otherwise no clear "
             "trend. A point with an error is shown with it and left out of the fits. Plot: `growth.png`.")
    L.append("")
    for dim, d in g["dimensions"].items():
        L.append(f"**{d['label']}** ({d['how']})")
        L.append("")
        L.append("| " + d["label"] + " | exec: CPU/op (us), events/op | connect: CPU/op (us) | peak RSS (MB) | "
                 "RSS at stop (MB) | start (s) | note |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for p in d["points"]:
            def v(k, p=p):
                if p.get(k) is None:
                    return "-"
                seen = [r[k] for r in p.get("rounds") or [] if r.get(k) is not None and not r.get("error")]
                if len(seen) > 1 and min(seen) != max(seen):
                    return f"{p[k]} ({min(seen)}–{max(seen)})"
                return str(p[k])
            ex = "-" if p.get("exec_us_per_op") is None else f"{v('exec_us_per_op')}, {p.get('exec_events_per_op')}"
            errs = [p["error"]] if p.get("error") else [f"a round: {e}" for e in p.get("round_errors") or []]
            note = "; ".join("error: " + str(e).splitlines()[-1][:200].replace("|", "/") for e in errs[:1])
            L.append(f"| {p['x']:,} | {ex} | {v('connect_us_per_op')} | {v('rss_hwm_mb')} | {v('rss_end_mb')} | "
                     f"{v('startup_s')} | {note} |")
        L.append("")
        for m, f in d["fits"].items():
            L.append(f"- {METRICS[m][0]}: **{f['growth']}** — {f['text']}")
        L.append("")
        lr = g.get("learned") if dim == "allow_list" else None
        if lr:
            L.append(f"Kernel side (`bench.egress_storm`: {lr['connects']} connects to a learned address from a "
                     "netns with no route, proc + net probes, the `learned` map filled as DNS answers would): "
                     "BPF run time of the connect hook per connect.")
            L.append("")
            L.append("| learned addresses | names | BPF ns/connect | wall ns/connect |")
            L.append("| --- | --- | --- | --- |")
            if lr.get("plain"):
                L.append(f"| none (no allow-list) | 0 | {lr['plain'].get('bpf_ns_per_connect')} | "
                         f"{lr['plain'].get('wall_ns_per_connect')} |")
            for p in lr["points"]:
                L.append(f"| {p['learned']:,} | {p.get('names'):,} | {p.get('bpf_ns_per_connect')} | "
                         f"{p.get('wall_ns_per_connect')} |")
            L.append("")
            if lr.get("fit"):
                L.append(f"- BPF run time per connect: **{lr['fit']['growth']}** — {lr['fit']['text']}")
            if lr.get("error"):
                L.append(f"- error: {lr['error'].splitlines()[-1][:300]}")
            L.append("")
    return L


def plot(g: dict | None, path: Path) -> bool:
    if not g or "dimensions" not in g:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    dims = list(g["dimensions"])
    if not dims:
        return False
    fig, axes = plt.subplots(2, len(dims), figsize=(4 * len(dims), 7), squeeze=False)
    for j, dim in enumerate(dims):
        d = g["dimensions"][dim]
        pts = [p for p in d["points"] if "error" not in p]
        for row, metrics in ((0, ("exec_us_per_op", "connect_us_per_op")), (1, ("rss_hwm_mb", "rss_end_mb"))):
            ax = axes[row][j]
            for m in metrics:
                xy = [(p["x"], p[m]) for p in pts if p.get(m) is not None]
                if xy:
                    f = d["fits"].get(m, {})
                    line, = ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o",
                                    label=f"{METRICS[m][0].split(',')[0]} ({f.get('growth', '?')})")
                    seen = [(p["x"], r[m]) for p in pts for r in p.get("rounds") or []
                            if r.get(m) is not None and not r.get("error")]
                    if len(seen) > len(xy):   # each session, so the scatter is seen beside the trend
                        ax.scatter([a for a, _ in seen], [b for _, b in seen], s=10, color=line.get_color(),
                                   alpha=0.5)
            xs = [p["x"] for p in pts if p.get("x")]
            if xs and max(xs) / min(xs) >= 50:   # a decade-spanning axis; rules stay linear
                ax.set_xscale("log")
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
            ax.set_xlabel(d["label"])
            ax.set_ylabel("tracer CPU per operation (us)" if row == 0 else "RSS (MB)")
            ax.legend(fontsize=7)
    fig.suptitle("agenttrace cost against scale (enforce mode, every default probe)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    """`python -m bench.growth --dim allow_list --x 10,100000 --before EXE`: chosen points of one
    dimension for this build and the build before, sessions alternated, the same sessions as the
    growth section (for a before/after figure without the whole benchmark)."""
    import argparse
    import json
    import tempfile
    ap = argparse.ArgumentParser(prog="python -m bench.growth", description=main.__doc__)
    ap.add_argument("--dim", choices=sorted(DIMENSIONS), required=True)
    ap.add_argument("--x", required=True, help="comma-separated points, e.g. 10,100000")
    ap.add_argument("--size", choices=sorted(POINTS), default="tiny", help="storm sizes and repetitions")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--before", help="agenttrace executable of the build before the change")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    builds = ["after"]
    if a.before:
        tracers.BEFORE["exe"] = a.before
        builds.append("before")
    for b in builds:
        why = tracers.agenttrace_unavailable(b)
        if why:
            ap.error(f"{b}: {why}")
    xs = [int(v) for v in a.x.split(",")]
    cfg = POINTS[a.size]
    work = Path(tempfile.mkdtemp(prefix="agenttrace-growth-"))
    # its fifos and the tracers' stderr files: gone with the run, whatever ends it
    atexit.register(shutil.rmtree, work, True)
    gens = loadgen.build(REPO / "bench" / "out" / "bin")
    rows = []
    with sysinfo.AgentCgroup(tag="growth") as cg:
        for rnd in range(a.rounds):
            for x in xs:
                for b in (builds if rnd % 2 == 0 else builds[::-1]):
                    r = run_point(a.dim, x, cg, work, gens, cfg, build=b)
                    r.setdefault("build", b)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    print(f"\n| build | {a.dim} | start to `started` (s) | peak RSS (MB) | RSS at stop (MB) | exec CPU/op (us) | "
          "connect CPU/op (us) | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['build']} | {r['x']:,} | {r.get('startup_s', '-')} | {r.get('rss_hwm_mb', '-')} | "
              f"{r.get('rss_end_mb', '-')} | {r.get('exec_us_per_op', '-')} | {r.get('connect_us_per_op', '-')} | "
              f"{str(r.get('error', ''))[-120:]} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
