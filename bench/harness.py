"""`python -m bench`: every workload under every tracer, alternated, several rounds; then the
zero-drop sweep and latency for agenttrace; writes result.json, report.md and a plot.

Order of work: one untimed warm-up pass of every workload with no tracer, then the rounds, the
tracer configurations of each in a Williams order (bench/schedule.py: every configuration at
every position, and after a different neighbour, as evenly as the number of rounds allows, on a
noisy 2-core node); inside one tracer session every workload runs once per placement and
repetition, the placements alternating between rounds. Ratios divide medians of the same run's
no-tracer rounds, with a 95% interval (bench/interval.py).

BPF run-time stats (BPF_ENABLE_STATS) are off for the judged repetitions, as agenttrace ships:
they cost two clock reads per program run, and agenttrace runs ~11 programs per refused connect
and ~21 per loopback connect where bpftrace runs 1-2 (stats on vs off, 8 alternated pairs under
agenttrace-enforce, 2026-12-06: refused_storm +6.2% workload CPU, connect_storm +4.2%, exec_storm
none). Each workload and placement then gets one more repetition per session with them on, whose
deltas are the BPF figures; report.summarize keeps the two apart."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import backlog, growth, loadgen, profile, report, schedule, sysinfo, tracers, untraced

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workload:
    name: str
    gen: str
    placements: tuple
    kind: str | None  # the event kind every operation produces for a tracer; None: untraced
    what: str

    def args(self, size: dict) -> list:
        n = size[self.name]
        return [n, 64] if self.name == "burst" else [n]

    def expected(self, size: dict, placement: str) -> int:
        """Events of `kind` a tracer should report for one run (0 outside the agent cgroup)."""
        if placement != "inside" or self.kind is None:
            return 0
        return 1 if self.name == "bulk_tcp" else size[self.name]


WORKLOADS = [
    Workload("exec_storm", "exec_storm", ("inside", "outside"), "exec", "fork + exec /bin/true, one at a time"),
    Workload("connect_storm", "connect_storm", ("inside", "outside"), "connect",
             "loopback TCP connect + RST close to a listener thread"),
    Workload("refused_storm", "refused_storm", ("inside", "outside"), "connect",
             "TCP connect to a closed loopback port (ECONNREFUSED)"),
    Workload("bulk_tcp", "bulk_tcp", ("inside", "outside"), "connect",
             "one loopback TCP connection, N MiB in 128 KiB writes"),
    Workload("getppid_loop", "getppid_loop", ("outside",), None, "syscall(SYS_getppid) loop: the untraced-syscall tax"),
    Workload("write_loop", "write_loop", ("outside",), None, "64-byte write(2) to /dev/null loop"),
    Workload("burst", "burst", ("inside",), "exec",
             "N execs of /bin/true as fast as possible, 64 children alive at once (ring-buffer sizing)"),
]
WORKLOAD_NAMES = [w.name for w in WORKLOADS] + ["untraced", "rate_sweep", "growth", "backlog"]

SIZES = {
    "tiny": {"exec_storm": 30, "connect_storm": 200, "refused_storm": 500, "bulk_tcp": 8,
             "getppid_loop": 200_000, "write_loop": 100_000, "burst": 300,
             "rate_steps": [2_000, 10_000], "rate_ms": 300, "rounds": 1, "reps": 1, "profile_execs": 100,
             "backlog_pairs": 2},
    # small: each run >= ~200 ms of workload CPU with no tracer on the 2-core VM (the 2026-12-02
    # baseline's no-tracer runs scaled: exec 229 ms, connect ~211, refused ~217, bulk ~220 (800 MiB: 600 measured 138 ms under load),
    # getppid 267, write ~214): at 40-95 ms the network storms' sessions spread 9-32%. Longer
    # would push `make bench --before` past ~12 minutes (auditd alone pays ~40 us per connect)
    "small": {"exec_storm": 400, "connect_storm": 9_000, "refused_storm": 35_000, "bulk_tcp": 800,
              "getppid_loop": 2_000_000, "write_loop": 1_200_000, "burst": 10_000,
              "rate_steps": [10_000, 20_000, 35_000, 50_000, 75_000, 100_000, 150_000, 200_000], "rate_ms": 2_000, "profile_execs": 6_000,
              "rounds": 5, "reps": 2, "backlog_pairs": 5},
    "full": {"exec_storm": 2_000, "connect_storm": 20_000, "refused_storm": 50_000, "bulk_tcp": 1_024,
             "getppid_loop": 10_000_000, "write_loop": 5_000_000, "burst": 10_000,
             "rate_steps": [10_000, 20_000, 35_000, 50_000, 75_000, 100_000, 150_000, 200_000, 300_000, 400_000],
             "rate_ms": 5_000, "rounds": 7, "reps": 3, "profile_execs": 10_000, "backlog_pairs": 7},
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list, p: float):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def lat_summary(values: list) -> dict | None:
    if not values:
        return None
    return {"n": len(values), "p50_ms": percentile(values, 50) / 1e6, "p99_ms": percentile(values, 99) / 1e6,
            "max_ms": max(values) / 1e6}


def probe_bpf_stats() -> bool:
    """Whether the kernel grants BPF_ENABLE_STATS, asked once (enabled, then closed at once):
    holding the fd for the whole run taxed every judged repetition."""
    with sysinfo.bpf_stats_on() as on:
        pass
    if not on:
        log("BPF run-time stats unavailable (BPF_ENABLE_STATS refused): no BPF figures")
    return on


class Bench:
    def __init__(self, opts):
        self.opts = opts
        self.size = SIZES[opts.size]
        self.out = Path(opts.out)
        self.work = self.out / "work"
        self.runs: list[dict] = []
        self.sessions: list[dict] = []
        self.latencies: dict[str, list] = {}  # "tracer|workload/placement" -> ns values
        self.cg: sysinfo.AgentCgroup | None = None
        self.gens: dict = {}
        self.bpf_stats = False  # BPF run-time stats available and wanted: one stats-on repetition

    # -- one tracer session: every selected workload, each placement
    def session(self, tname: str, rnd: int, workloads: list) -> None:
        tracer = tracers.make(tname)
        sess = {"tracer": tname, "round": rnd, "ok": False}
        pending = []
        started = False
        # the last configuration's leftovers (dirty pages, a daemon's exit) are not this one's
        sess["settle"] = sysinfo.settle()
        t_start = time.monotonic()
        try:
            tracer.start(self.cg, self.work, self.gens)
            started = True
            sess["startup_s"] = tracer.startup_s
            if getattr(tracer, "started", None):
                sess["started"] = tracer.started
            # what the tracer hooks: BCC names a tracepoint program after its category
            # (sched__..., sock__..., syscalls__...), so a syscall tracepoint shows here; the
            # names come from fdinfo, which lists every program with or without run-time stats
            sess["bpf_programs"] = sorted({v[0] for v in sysinfo.bpf_prog_stats(tracer.pids()).values()})
            for wl in workloads:
                for rep, pl, stats in self.plan(wl, rnd):
                    pending.append(self.timed_run(tracer, tname, rnd, wl, rep, pl, stats))
            sess["ok"] = True
        except (tracers.TracerError, loadgen.LoadgenError, OSError) as e:
            sess["error"] = str(e)
            log(f"{tname} round {rnd}: {e}")
        finally:
            if started or tracer.proc is not None or getattr(tracer, "rule_added", False):
                try:
                    sess.update(tracer.stop())
                except (tracers.TracerError, OSError) as e:
                    sess["ok"] = False
                    sess["error"] = (sess.get("error", "") + f"; stop: {e}").lstrip("; ")
                    log(f"{tname} round {rnd} stop: {e}")
            sess["wall_s"] = time.monotonic() - t_start
            if tracer.proc is not None:
                sess["pid"] = tracer.proc.pid
            self.sessions.append(sess)
        for rec, m0, m1 in pending:
            w = tracer.window(m0, m1)
            rec["events"] = w["events"]
            rec["events_by_kind"] = w["by_kind"]
            kind = next(x.kind for x in WORKLOADS if x.name == rec["workload"])
            rec["seen_expected_kind"] = w["by_kind"].get(kind, 0) if kind else 0
            if w["latency_ns"]:
                rec["latency"] = lat_summary(w["latency_ns"])
                self.latencies.setdefault(f"{tname}|{rec['workload']}/{rec['placement']}", []).extend(w["latency_ns"])

    def plan(self, wl: Workload, rnd: int) -> list:
        """(rep, placement, bpf_stats) of one workload in one session: the judged repetitions
        with BPF run-time stats off, as agenttrace ships (on, they cost ~2 clock reads per
        program run: refused_storm +6.2% workload CPU under agenttrace-enforce, 8 alternated
        pairs, 2026-12-06), then one repetition per placement with them on for the BPF figures."""
        placements = wl.placements if rnd % 2 == 0 else tuple(reversed(wl.placements))
        reps = self.opts.reps if wl.name != "burst" else 1
        judged = [(r, p, False) for r in range(reps) for p in placements]
        return judged + ([(reps, p, True) for p in placements] if self.bpf_stats else [])

    def timed_run(self, tracer, tname: str, rnd: int, wl: Workload, rep: int, pl: str, stats: bool) -> tuple:
        """One workload run under `tracer`: its record (appended to the runs) and the tracer's
        output marks around it. With `stats` the run-time stats are on from just before the
        first BPF snapshot to just after the second, and no longer."""
        pids = tracer.pids()
        with sysinfo.bpf_stats_on(stats) as on:
            b0 = sysinfo.bpf_prog_stats(pids) if on else {}
            m0, c0 = tracer.mark(), tracer.cpu_ns()
            res = loadgen.run(self.gens[wl.gen], wl.args(self.size), self.cg.path if pl == "inside" else None)
            expected = wl.expected(self.size, pl)
            tracer.drain(m0, expected)
            m1, c1 = tracer.mark(), tracer.cpu_ns()
            b1 = sysinfo.bpf_prog_stats(pids) if on else {}
        tracer.alive_check()
        rec = {"round": rnd, "rep": rep, "tracer": tname, "workload": wl.name, "placement": pl,
               "n": res.n, "elapsed_ns": res.elapsed_ns, "cpu_ns": res.cpu_ns, "errors": res.errors,
               "expected_events": expected, "tracer_cpu_ns": max(c1 - c0, 0), "bpf_stats": on, **res.extra}
        if on:
            rec["bpf"] = sysinfo.bpf_stats_delta(b0, b1)
        self.runs.append(rec)
        return rec, m0, m1

    def warmup(self, workloads: list) -> list:
        """Every workload once per placement, no tracer, not counted: the first timed session
        then does not pay for first use (generator pages, /bin/true in the page cache, the
        loopback listener's first connections, a cgroup never entered). The burst is an exec
        storm in another shape and is left out."""
        log("warm-up: every workload once, no tracer, not counted")
        out = []
        for wl in workloads:
            if wl.name == "burst":
                continue
            for pl in wl.placements:
                res = loadgen.run(self.gens[wl.gen], wl.args(self.size), self.cg.path if pl == "inside" else None)
                out.append({"workload": wl.name, "placement": pl, "elapsed_ns": res.elapsed_ns, "cpu_ns": res.cpu_ns})
        return out

    def first_starts(self, names: list) -> list:
        """Each agenttrace configuration started and stopped once before the rounds, untimed
        for the goals: a start on a kernel, flag set or probe source the probe cache has not
        seen compiles (seconds; `started` says `probe_cache: compiled`), every later one does
        not. Without this pass whichever configuration came first in round 1 paid the compile
        and the start goal read the first start after an install, not the node's every start;
        the figure is kept and reported beside the goal."""
        out = []
        for n in names:
            if not n.startswith("agenttrace"):
                continue
            tracer = tracers.make(n)
            rec = {"tracer": n}
            try:
                tracer.start(self.cg, self.work, self.gens)
                rec["startup_s"] = tracer.startup_s
                rec["probe_cache"] = (tracer.started or {}).get("probe_cache")
            except (tracers.TracerError, OSError) as e:
                rec["error"] = str(e)
            finally:
                if tracer.proc is not None:
                    try:
                        tracer.stop()
                    except (tracers.TracerError, OSError) as e:
                        rec["error"] = (rec.get("error", "") + f"; stop: {e}").lstrip("; ")
            log(f"first start of {n}: {rec.get('startup_s', '-')} s, probe cache {rec.get('probe_cache')}")
            out.append(rec)
        return out

    # -- agenttrace only: zero-drop sweep, then latency at half the zero-drop rate
    def rate_step(self, rate: int, ms: int) -> dict:
        mode = self.opts.rate_mode
        tracer = tracers.make("agenttrace-monitor")
        step = {"target_rate": rate, "ms": ms, "gen_mode": mode}
        try:
            tracer.start(self.cg, self.work, self.gens)
            m0, c0 = tracer.mark(), tracer.cpu_ns()
            res = loadgen.run(self.gens["rate"], [mode, rate, ms, 1], self.cg.path)
            gen_end = time.monotonic()
            c_gen = tracer.cpu_ns()
            tracer.drain(m0, res.n, quiet=0.5, timeout=180)
            m1 = tracer.mark()
            # the tracer's CPU while the generator ran, per second of the step: 1.0 = one core
            step["tracer_cores"] = round((c_gen - c0) / max(res.elapsed_ns, 1), 3)
            step["tracer_cpu_step_ns"] = tracer.cpu_ns() - c0
            # how long the tracer needed after the generator stopped: its backlog at the end
            step["catch_up_s"] = round(max(tracer.tap.last_arrival - gen_end, 0.0), 3)
        except (tracers.TracerError, loadgen.LoadgenError) as e:
            step["error"] = str(e)
            if tracer.proc is not None:
                try:
                    tracer.stop()
                except (tracers.TracerError, OSError):
                    pass
            return step
        st = tracer.stop()
        w = tracer.window(m0, m1)
        kind = "exec" if mode == "exec" else "connect"
        received = w["by_kind"].get(kind, 0)
        drops = st.get("drops")
        # drops of this kind only: the kernel counts them per event type, the sinks per sink
        d = (st.get("counters") or {}).get("drops")
        kind_drops = drops
        if isinstance(d, dict) and isinstance(d.get("kernel_by_type"), dict):
            kind_drops = int(d["kernel_by_type"].get(kind, 0)) + (tracers.drops_total(d.get("sinks")) or 0)
        step.update({"generated": res.n, "achieved_rate": round(res.n * 1e9 / res.elapsed_ns),
                     "received": received, "drops_reported": drops, "drops_of_kind": kind_drops,
                     "drops_detail": d if isinstance(d, dict) else None,
                     "missing": res.n - received,
                     "unaccounted": None if kind_drops is None else res.n - received - kind_drops,
                     "latency": lat_summary(w["latency_ns"]), "tracer_cpu_ns": st.get("cpu_ns"),
                     "rss_hwm_kb": st.get("rss_hwm_kb")})
        return step

    def rate_sweep(self) -> dict:
        # BPF run-time stats stay off, as agenttrace ships and as in the rounds: no figure here
        # reads them, and on they would tax the generator's every connect
        steps, ms = self.size["rate_steps"], self.size["rate_ms"]
        what = {"udp": "connect(2) repeated on one UDP socket to a loopback port (one syscall, no packet, "
                       "per connect event)",
                "refused": "TCP connect(2) to a closed loopback port",
                "connect": "TCP connect(2) + RST close to a loopback listener",
                "exec": "posix_spawn of /bin/true (exec, fork-free; exit events come too)"}[self.opts.rate_mode]
        out = {"generator": f"rate {self.opts.rate_mode}: {what}, paced in 1 ms slices, {ms} ms per step",
               "mode": "agenttrace-monitor", "steps": []}
        best = best_any = None
        for rate in steps:
            log(f"rate sweep: {rate}/s for {ms} ms")
            step = self.rate_step(rate, ms)
            out["steps"].append(step)
            if "error" in step:
                break
            clean = step["drops_reported"] == 0 and step["missing"] == 0
            # Sustained: no drops and the tracer kept pace, i.e. it had written the last line
            # within a tenth of the step's length after the generator stopped. A tracer that
            # falls behind is only living off its ring buffer and would drop on a longer step.
            step["kept_pace"] = step.get("catch_up_s", 0) <= ms / 10_000
            if clean:
                best_any = step
                if step["kept_pace"]:
                    best = step
            else:
                out["first_dropping"] = step
                break
            if step["achieved_rate"] < 0.8 * rate:
                out["limit"] = (f"the generator reached only {step['achieved_rate']}/s of {rate}/s asked: "
                                "the machine, not the tracer, set the ceiling")
                break
        out["max_zero_drop_rate"] = best["achieved_rate"] if best else 0
        # the paced generator ends a hair under its target (its last slice); 99% of the target
        # achieved counts as the step's rate
        out["max_zero_drop_target"] = (best["target_rate"] if best and best["achieved_rate"] >= 0.99 * best["target_rate"]
                                       else out["max_zero_drop_rate"])
        out["max_zero_drop_rate_any"] = best_any["achieved_rate"] if best_any else 0
        out["sustained_rule"] = (f"no drops, nothing missing, and the last line written within "
                                 f"{ms / 10_000:.2f} s (a tenth of the step) of the generator's end")
        half = max((best["achieved_rate"] if best else steps[0]) // 2, 100)
        log(f"latency at half the zero-drop rate: {half}/s")
        lat = self.rate_step(half, ms)
        out["latency_at_half"] = lat
        return out

    def run(self) -> dict:
        opts = self.opts
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        result = {"schema": "agenttrace-bench/1", "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                  "machine": sysinfo.machine(),
                  "config": {"size": opts.size, "rounds": opts.rounds, "reps": opts.reps, "sizes": self.size,
                             "tracers_requested": opts.tracers, "only": opts.only, "judge": opts.judge,
                             "warmup": opts.warmup, "order": "williams (bench/schedule.py)",
                             "session_figure": "median",
                             "cpu_time_source": "sum of /proc/<pid>/task/*/schedstat run time (ns) over the "
                                                "tracer's process tree; auditd adds the kauditd kernel thread",
                             "audit_login_uid": loadgen.BENCH_AUID,
                             "before": tracers.BEFORE.get("exe"),
                             "after": str(tracers.agenttrace_exe() or "")}}
        self.gens = loadgen.build(self.out / "bin")
        names = tracers.expand(opts.tracers)
        info = {}
        for n in names:
            t = tracers.make(n)
            reason = t.unavailable()
            info[n] = {"available": reason is None, "reason": reason, "description": t.description,
                       "scope": t.scope}
            if reason:
                log(f"{n}: not available: {reason}")
        result["tracers"] = info
        active = [n for n in names if info[n]["available"]]
        only = set(opts.only or WORKLOAD_NAMES)
        workloads = [w for w in WORKLOADS if w.name in only]
        result["workloads"] = {w.name: {"what": w.what, "placements": list(w.placements), "event_kind": w.kind,
                                        "args": w.args(self.size)} for w in workloads}
        self.bpf_stats = opts.bpf_stats and probe_bpf_stats()
        result["config"]["bpf_stats"] = self.bpf_stats
        result["config"]["bpf_stats_sysctl"] = sysinfo.bpf_stats_sysctl()
        if result["config"]["bpf_stats_sysctl"] == "1":
            log("kernel.bpf_stats_enabled is 1: BPF run-time stats are on for every run, the judged ones too")
        self.cg = sysinfo.AgentCgroup().create()
        result["agent_cgroup"] = {"path": str(self.cg.path), "id": self.cg.id}
        try:
            if workloads:
                if opts.warmup:
                    result["warmup"] = self.warmup(workloads)
                    result["first_starts"] = self.first_starts(active)
                result["round_orders"] = []
                for rnd in range(opts.rounds):
                    order = schedule.round_order(active, rnd)
                    result["round_orders"].append(order)
                    log(f"round {rnd + 1}/{opts.rounds}: {', '.join(order)}")
                    for tname in order:
                        self.session(tname, rnd, workloads)
            # the untraced-syscall phase (bench/untraced.py): off / on blocks alternated, for the
            # 1.01x goal the rounds' single loops cannot resolve
            if "untraced" in only:
                # the build under test and the peers; a before build's starts would add ~30 s at small
                # for a figure no goal reads
                result["untraced"] = untraced.measure([t for t in active if not t.startswith("agenttrace-before")],
                                                     self.cg, self.work, self.gens, opts.size, log,
                                                     bpf_stats=self.bpf_stats)
            else:
                result["untraced"] = {"status": "not measured: not selected by --only"}
            if "rate_sweep" not in only:
                result["rate_sweep"] = {"status": "not measured: not selected by --only"}
            else:
                if not info.get("agenttrace-monitor", {}).get("available"):
                    why = (info["agenttrace-monitor"]["reason"] if "agenttrace-monitor" in info
                           else "agenttrace not among --tracers")
                    result["rate_sweep"] = {"status": f"not measured: {why}"}
                else:
                    result["rate_sweep"] = self.rate_sweep()
            if "growth" not in only:
                result["growth"] = {"status": "not measured: not selected by --only"}
            elif not any(t.startswith("agenttrace-") and not t.startswith("agenttrace-before") for t in active):
                result["growth"] = {"status": "not measured: " + next(
                    (info[t]["reason"] for t in info if t.startswith("agenttrace-") and info[t]["reason"]),
                    "agenttrace not among --tracers")}
            else:
                result["growth"] = growth.measure(self.cg, self.work, self.gens, opts.size, opts.growth_dims, log)
            # a record read behind a storm against one read live (bench/backlog.py)
            if "backlog" not in only:
                result["backlog"] = {"status": "not measured: not selected by --only"}
            elif not info.get("agenttrace-enforce", {}).get("available"):
                result["backlog"] = {"status": "not measured: agenttrace-enforce not among --tracers or unavailable"}
            else:
                builds = ["after"] + (["before"] if tracers.BEFORE.get("exe") else [])
                log("backlog: connect storms read behind and live")
                result["backlog"] = backlog.measure(builds, self.size.get("backlog_pairs", 5),
                                                    self.size["connect_storm"], self.work, log, cg=self.cg,
                                                    gens=self.gens)
            if opts.profile:
                # the exec storm, under the build measured and under the before build when given
                builds = ["after"] + (["before"] if tracers.BEFORE.get("exe") else [])
                result["profile"] = {}
                for build in builds:
                    log(f"profiling agenttrace-enforce ({build}) under an exec storm with py-spy")
                    result["profile"][build] = profile.profile_agenttrace("enforce", self.cg, self.work, self.gens,
                                                                          self.size, build=build,
                                                                          bpf_stats=self.bpf_stats)
        finally:
            self.cg.remove()
        result["runs"] = self.runs
        result["sessions"] = self.sessions
        result["latency"] = {k: lat_summary(v) for k, v in sorted(self.latencies.items())}
        result["summary"] = report.summarize(self.runs, self.sessions, active, workloads)
        result["goals"] = report.goals(result)
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result["duration_s"] = round(time.time() - t0, 1)
        return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per configuration (default by size: "
                    + ", ".join(f"{k} {v['rounds']}" for k, v in SIZES.items())
                    + "); 3 or more give every ratio a 95%% interval")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions of each workload inside one tracer session; their median is the "
                         "session's figure "
                         "(default by size: " + ", ".join(f"{k} {v['reps']}" for k, v in SIZES.items())
                         + "; burst always runs once), with BPF run-time stats off; one more repetition "
                           "with them on follows for the BPF figures unless --no-bpf-stats")
    ap.add_argument("--only", default=None,
                    help="comma-separated workloads to run (" + ", ".join(WORKLOAD_NAMES) + ")")
    ap.add_argument("--tracers", default="none,agenttrace,bpftrace,bpftrace-syscalls,auditd",
                    help="comma-separated: none, agenttrace (= agenttrace-monitor + agenttrace-enforce), "
                         "agenttrace-monitor, agenttrace-enforce, bpftrace, bpftrace-syscalls, auditd; "
                         "agenttrace-<mode>-wake<ms> runs agenttrace with --wakeup-ms <ms> (wake0: the "
                         "reader woken on every record, for before/after figures)")
    ap.add_argument("--rate-mode", choices=("udp", "refused", "connect", "exec"), default="udp",
                    help="event source of the zero-drop sweep (default udp: the cheapest connect event to "
                         "make, so the tracer and not the generator meets the limit first)")
    ap.add_argument("--judge", choices=("cpu", "wall"), default="cpu",
                    help="which slowdown ratio the goals are judged on: the workload's CPU time (default; "
                         "robust to neighbours on a shared node) or its wall-clock time; both are reported")
    ap.add_argument("--profile", action="store_true",
                    help="after the measured rounds, profile agenttrace under exec/connect storms with py-spy "
                         "(found on PATH, in the venv, or $BENCH_PYSPY) and its BPF programs' run time")
    ap.add_argument("--before", default=os.environ.get("BENCH_AGENTTRACE_BEFORE"), metavar="EXE",
                    help="agenttrace executable of the build before the change (default $BENCH_AGENTTRACE_BEFORE): "
                         "adds agenttrace-before-enforce to the rounds unless --tracers names before "
                         "configurations itself, and profiles it beside the build under test")
    ap.add_argument("--growth-dims", default=",".join(growth.DIMENSIONS),
                    help="dimensions of the growth section (" + ", ".join(growth.DIMENSIONS) + ")")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed warm-up pass of every workload before the first round")
    ap.add_argument("--no-bpf-stats", dest="bpf_stats", action="store_false",
                    help="no repetition with BPF run-time statistics (BPF_ENABLE_STATS) on, and none for the "
                         "untraced phase and profile either; with them, the time each tracer's BPF programs "
                         "spend in the traced tasks is reported per event (the judged repetitions run with "
                         "them off either way)")
    ap.add_argument("--out", default=str(HERE / "out"), help="output folder (default bench/out)")
    opts = ap.parse_args(argv)
    if opts.rounds is None:
        opts.rounds = SIZES[opts.size]["rounds"]
    if opts.reps is None:
        opts.reps = SIZES[opts.size]["reps"]
    if opts.rounds < 1 or opts.reps < 1:
        ap.error("--rounds and --reps must be at least 1")
    opts.tracers = [t.strip() for t in opts.tracers.split(",") if t.strip()]
    if opts.before:
        tracers.BEFORE["exe"] = opts.before
        if not any("before" in t for t in opts.tracers):
            opts.tracers.append("agenttrace-before-enforce")
    opts.growth_dims = [d.strip() for d in opts.growth_dims.split(",") if d.strip()]
    bad = [d for d in opts.growth_dims if d not in growth.DIMENSIONS]
    if bad:
        ap.error(f"unknown growth dimension {', '.join(bad)}; known: {', '.join(growth.DIMENSIONS)}")
    try:
        tracers.expand(opts.tracers)
    except ValueError as e:
        ap.error(str(e))
    if opts.only:
        opts.only = [w.strip() for w in opts.only.split(",") if w.strip()]
        bad = [w for w in opts.only if w not in WORKLOAD_NAMES]
        if bad:
            ap.error(f"unknown workload {', '.join(bad)}; known: {', '.join(WORKLOAD_NAMES)}")
    return opts


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench: needs root (cgroups, tracers)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(opts)
    try:
        result = bench.run()
    except loadgen.LoadgenError as e:
        print(f"python -m bench: {e}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    out = Path(opts.out)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    files = report.write(result, out)
    log(f"wrote {out / 'result.json'}, " + ", ".join(str(f) for f in files))
    return 0
