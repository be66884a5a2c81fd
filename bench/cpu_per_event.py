"""Tracer CPU per logged exec and per logged connect, for one or more agenttrace builds side by
side in one run (issue 15), optionally with a py-spy profile folded into pipeline stages.

    sudo .venv/bin/python -m bench.cpu_per_event \\
        --build before=/work/wt-before/.venv/bin/agenttrace --build after=.venv/bin/agenttrace \\
        [--build bpftrace=bpftrace] \\
        --execs 2000 --connects 4000 --rounds 3 [--profile bench/profiles]

Each round starts one `agenttrace run --cgroup <agent cgroup> --output <fifo>` session per
build (order rotated every round), runs the exec storm (fork + exec /bin/true + exit) and the
loopback connect storm inside the agent cgroup, and charges the tracer the on-CPU time of its
process tree (per-thread schedstat) from just before the storm until its output has been quiet
for 0.25 s, divided by the storm's operations. Schedstat is far steadier than wall time on a
shared machine. Figures are medians over rounds. With --profile a separate session per build
runs under py-spy and the samples are folded into top frames and µs per operation by stage.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import loadgen, sysinfo, tracers
from .profile import _short, fold, pyspy_exe

REPO = Path(__file__).resolve().parent.parent

# Frame (file:function, as bench.profile._short writes it) -> stage; a sample goes to the
# stage of the innermost frame on its stack that names one.
STAGES = [
    ("ringbuf.py:consume", "read (ring walk)"),
    ("ringbuf.py:poll", "read (wait + wakeup)"),
    ("wire.py:decode_buf", "decode"),
    ("wirefast.py", "decode"),
    ("enricher.py", "enrich"),
    ("proctable.py", "enrich"),
    ("exeid.py", "enrich: exe identity"),
    ("sshconfig.py", "enrich: ssh"),
    ("scope.py", "enrich"),
    ("cgroups.py", "enrich"),
    ("timefmt.py", "enrich"),
    ("engine.py", "match"),
    ("rules.py", "match"),
    ("summary.py", "summaries"),
    ("outputs.py", "sink (JSON render + write)"),
    ("ocsf.py", "sink (OCSF)"),
    ("pipeline.py:_flush", "sink (JSON render + write)"),
    ("pipeline.py:_process", "pipeline"),
    ("pipeline.py:_on_view", "pipeline"),
]


def _stage_of(frames: list[str]) -> str:
    for f in reversed(frames):
        file, _, func = f.partition(":")
        func = func.rsplit(".", 1)[-1]      # 'RingReader.poll' -> 'poll'
        for key, stage in STAGES:
            kf, _, kfunc = key.partition(":")
            if kf == file and (not kfunc or kfunc == func):
                return stage
    return "other (loop, timers, threads)"


def stages(raw: str) -> dict[str, float]:
    """Share of samples per stage (0..1)."""
    out: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")[1:]]
        if not frames:
            continue
        n = int(count)
        total += n
        s = _stage_of(frames)
        out[s] = out.get(s, 0) + n
    return {k: v / total for k, v in sorted(out.items(), key=lambda kv: -kv[1])} if total else {}


def _session(label: str, exe: Path, cg, work: Path, gens: dict, n_exec: int, n_conn: int,
             mode: str, spy_out: Path | None = None) -> dict:
    if str(exe) == "bpftrace":
        # the peer, configured as bench/tracers.py does (sched_process_exec + inet_sock_set_state)
        t = tracers.Bpftrace("bpftrace")
    else:
        os.environ["BENCH_AGENTTRACE"] = str(exe)
        tracers._AGENTTRACE_CHECK.clear()
        t = tracers.Agenttrace(mode)
        t.name = f"{label}-{mode}"
    res: dict = {"build": label}
    spy = None
    try:
        t.start(cg, work, gens)
        loadgen.run(gens["exec_storm"], [20], cg.path)      # warm caches (identity, /proc reads)
        m = t.mark()
        t.drain(m, 1)
        if spy_out is not None:
            spy = subprocess.Popen([pyspy_exe(), "record", "--pid", str(t.proc.pid), "--rate", "1000",
                                    "--format", "raw", "--nonblocking", "--output", str(spy_out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(1.0)
        for wl, n, key in (("exec_storm", n_exec, "exec"), ("connect_storm", n_conn, "connect")):
            m0 = t.mark()
            c0 = t.cpu_ns()
            r = loadgen.run(gens[wl], [n], cg.path)
            t.drain(m0, r.n)
            c1 = t.cpu_ns()
            m1 = t.mark()
            w = t.window(m0, m1)
            res[key] = {"ops": r.n, "cpu_ns": c1 - c0, "us_per_op": round((c1 - c0) / r.n / 1000, 2),
                        "records": w["by_kind"], "workload_ms": round(r.elapsed_ns / 1e6, 1)}
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        if t.proc is not None:
            st = t.stop()
            res["drops"] = st.get("drops")
            res["rss_hwm_kb"] = st.get("rss_hwm_kb")
    return res


def _write_profile(path: Path, label: str, exe: Path, sess: dict, raw: str) -> None:
    f = fold(raw, top=25)
    sh = stages(raw)
    ops = sess["exec"]["ops"] + sess["connect"]["ops"]
    cpu = sess["exec"]["cpu_ns"] + sess["connect"]["cpu_ns"]
    lines = [f"# py-spy profile of `agenttrace run` ({label}: {exe}) under an exec storm then a connect storm",
             f"# {sysinfo.machine().get('kernel', '')}  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
             f"# sampled at 1000 Hz; {f['samples']} samples; figures below are this (profiled) session's,",
             "# slower than unprofiled ones: the unprofiled medians are in the run's summary",
             ""]
    for key in ("exec", "connect"):
        s = sess[key]
        lines.append(f"{key} storm: {s['ops']} ops, tracer CPU {s['cpu_ns'] / 1e6:.1f} ms = "
                     f"{s['us_per_op']} µs per {key}; records {s['records']}")
    lines += ["", f"µs per operation by stage (share of samples × tracer CPU of both storms ÷ {ops} ops):"]
    for st, share in sh.items():
        lines.append(f"  {share * 100:5.1f}%  {share * cpu / ops / 1000:7.2f} µs  {st}")
    # py-spy counts a thread in time.sleep as running (it is not on its list of blocking
    # calls), so the wait stage holds sleeping time the schedstat CPU figure does not; the
    # tracer's CPU shared out over the other samples is the closer estimate
    busy = {k: v for k, v in sh.items() if k != "read (wait + wakeup)"}
    tot = sum(busy.values())
    if tot and len(busy) < len(sh):
        lines += ["", "the same without the wait frames (py-spy samples time.sleep as running):"]
        for st, share in busy.items():
            lines.append(f"  {share / tot * 100:5.1f}%  {share / tot * cpu / ops / 1000:7.2f} µs  {st}")
    lines += ["", "top frames, self time:"]
    lines += [f"  {x['pct']:5.1f}%  {x['function']}" for x in f["top_self"]]
    lines += ["", "top frames, inclusive:"]
    lines += [f"  {x['pct']:5.1f}%  {x['function']}" for x in f["top_inclusive"]]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_per_event", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="append", default=[], metavar="LABEL=PATH",
                    help="an agenttrace console script to measure (repeatable)")
    ap.add_argument("--execs", type=int, default=2000)
    ap.add_argument("--connects", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", default="monitor", choices=("monitor", "enforce"))
    ap.add_argument("--profile", metavar="DIR", help="also profile each build with py-spy, write DIR/<label>-*.txt")
    ap.add_argument("--json", metavar="FILE", help="write every session's figures here")
    ap.add_argument("--refold", nargs=3, metavar=("RAW", "SESSION_JSON", "OUT"),
                    help="rewrite a profile summary from a kept py-spy raw file and its session's figures")
    a = ap.parse_args(argv)
    if a.refold:
        raw, sess, out = a.refold
        s = json.loads(Path(sess).read_text())
        _write_profile(Path(out), s["build"], Path(s.get("exe", "?")), s, Path(raw).read_text(errors="replace"))
        return 0
    if not a.build:
        ap.error("give at least one --build LABEL=PATH")
    builds = []
    for b in a.build:
        label, _, path = b.partition("=")
        builds.append((label, Path(path) if path == "bpftrace" else Path(path).absolute()))
    work = Path(tempfile.mkdtemp(prefix="agenttrace-cpu-"))
    # its fifos and the tracers' stderr files: gone with the run, whatever ends it
    atexit.register(shutil.rmtree, work, True)
    gens = loadgen.build(REPO / "bench" / "out" / "bin")
    results: dict = {label: [] for label, _ in builds}
    with sysinfo.AgentCgroup(tag="cpu") as cg:
        for rnd in range(a.rounds):
            order = builds[rnd % len(builds):] + builds[:rnd % len(builds)]
            for label, exe in order:
                s = _session(label, exe, cg, work, gens, a.execs, a.connects, a.mode)
                results[label].append(s)
                print(json.dumps({"round": rnd, **s}), flush=True)
        if a.profile:
            pdir = Path(a.profile)
            pdir.mkdir(parents=True, exist_ok=True)
            for label, exe in builds:
                if str(exe) == "bpftrace":
                    continue
                raw = work / f"spy-{label}.txt"
                s = _session(label, exe, cg, work, gens, a.execs, a.connects, a.mode, spy_out=raw)
                if raw.exists():
                    _write_profile(pdir / f"{label}-{a.mode}.txt", label, exe, s, raw.read_text(errors="replace"))
                    (pdir / f"{label}-{a.mode}.session.json").write_text(json.dumps({**s, "exe": str(exe)}))
                    print(f"profile: {pdir / f'{label}-{a.mode}.txt'}", flush=True)
    print("\nmedian tracer CPU (schedstat of the tracer's process tree), over", a.rounds, "rounds:")
    for label, _ in builds:
        rs = results[label]
        if not rs:
            continue
        ex = statistics.median(r["exec"]["us_per_op"] for r in rs)
        co = statistics.median(r["connect"]["us_per_op"] for r in rs)
        print(f"  {label:10s} {ex:8.1f} µs per exec (fork+exec+exit)   {co:7.1f} µs per connect   "
              f"drops {[r.get('drops') for r in rs]}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
