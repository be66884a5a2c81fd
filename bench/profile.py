"""Where agenttrace's CPU goes: py-spy samples of a tracer session under a storm, folded into
the functions that take the most time (self and inclusive), plus the BPF programs' run time.

Run as its own session after the measured rounds (`--profile`): sampling costs the profiled
process, so it never shares a session with the figures the goals are judged on. BPF run-time
stats are on from just before the storm's first BPF snapshot to just after its last (the rounds
run without them); `bpf_stats=False` (`--no-bpf-stats`) leaves them off and the BPF table empty."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from . import loadgen, sysinfo, tracers


def pyspy_exe() -> str | None:
    for cand in (os.environ.get("BENCH_PYSPY"), str(Path(sys.prefix) / "bin" / "py-spy"), shutil.which("py-spy")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


_EXT = re.compile(r"\.cpython-[^.]*\.so$")


def _short(frame: str) -> str:
    """'emit (/work/main/tracer/sinks/outputs.py:88)' -> 'outputs.py:emit' (line numbers dropped so
    one function's samples add up); a compiled module's frame (py-spy --native) 'on_view
    (enricher.cpython-311-x86_64-linux-gnu.so)' -> 'enricher.so:on_view'."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{_EXT.sub('.so', os.path.basename(m.group('file')))}:{m.group('func')}"


def _glue(frame: str) -> bool:
    """Cython's call trampolines (__Pyx_CyFunction_Vectorcall_..., __Pyx_PyObject_FastCallDict):
    a frame between every two compiled functions that says nothing about where time goes."""
    return frame.split(":", 1)[-1].startswith("__Pyx_")


def fold(raw: str, top: int = 30) -> dict:
    """Summarise py-spy's collapsed stacks ('frame;frame;... count' per line)."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in (_short(f) for f in stack.split(";")[1:]) if not _glue(f)]  # first entry: the thread
        if not frames:
            continue
        total += n
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n

    def pct(d):
        return [{"function": k, "pct": round(100 * v / total, 1)}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "top_self": pct(self_t) if total else [], "top_inclusive": pct(incl) if total else []}


# execs of the profiled storm: enough samples (1000 Hz native, 250 Hz Python-only) for the top functions to settle
PROFILE_EXECS = {"tiny": 100, "small": 6000, "full": 10000}


def profile_agenttrace(mode: str, cg, work: Path, gens: dict, size: dict, build: str = "after",
                       bpf_stats: bool = True) -> dict:
    """py-spy of one agenttrace session (`build` "after": the build measured; "before": the
    --before build) under an exec storm in the agent cgroup."""
    exe = pyspy_exe()
    if exe is None:
        return {"status": "not measured: py-spy not found (pip install py-spy, or set BENCH_PYSPY)"}
    tracer = tracers.Agenttrace(mode, build=build)
    why = tracer.unavailable()
    if why:
        return {"status": f"not measured: {why}"}
    out = work / f"profile-{build}-{mode}.txt"
    result: dict = {"mode": mode, "build": build, "exe": str(tracers.agenttrace_exe(build))}
    spy = None
    stats = contextlib.ExitStack()
    try:
        tracer.start(cg, work, gens)
        # py-spy walks Python frames only: a module compiled by scripts/build_native.py shows no
        # frame of its own unless it unwinds native stacks too (--native), which needs the
        # process paused for each sample (no --nonblocking): dearer, but this session is its own.
        # Native samples of a waiting thread (epoll_wait, write on a full pipe) would count as
        # much as work: --gil keeps only samples holding the GIL, which waiting releases; more
        # samples a second make up for the ones it drops
        result["compiled_modules"] = list(((tracer.started or {}).get("native") or {}).get("loaded") or [])
        native = bool(result["compiled_modules"])
        how = ["--native", "--gil", "--rate", "1000"] if native else ["--nonblocking", "--rate", "250"]
        result["sampling"] = "native" if native else "nonblocking"
        pids = tracer.pids()
        stats.enter_context(sysinfo.bpf_stats_on(bpf_stats))
        b0 = sysinfo.bpf_prog_stats(pids)
        with open(work / f"py-spy-{build}-{mode}.stderr", "wb") as err:
            spy = subprocess.Popen([exe, "record", "--pid", str(tracer.proc.pid), "--format", "raw",
                                    *how, "--output", str(out)], stdout=err, stderr=err,
                                   start_new_session=True)
        ops = {}
        n = size.get("profile_execs") or max(size["exec_storm"], 100)
        m0, c0 = tracer.mark(), tracer.cpu_ns()
        r = loadgen.run(gens["exec_storm"], [n], cg.path)
        # an exec and its exit per operation; the sampled tracer pauses at every native sample,
        # so a short quiet spell is not yet the end of its backlog
        tracer.drain(m0, 2 * r.n, quiet=1.0, timeout=60.0)
        ops["exec_storm"] = r.n
        # includes py-spy's sampling cost to the process: compare builds, not with the rounds
        result["cpu_us_per_exec"] = round((tracer.cpu_ns() - c0) / max(r.n, 1) / 1000, 2)
        result["events_per_exec"] = round((tracer.mark()[1] - m0[1]) / max(r.n, 1), 2)
        b1 = sysinfo.bpf_prog_stats(pids)
        stats.close()
        result["workloads"] = ops
        result["bpf"] = sysinfo.bpf_stats_delta(b0, b1)
    except (tracers.TracerError, loadgen.LoadgenError, OSError) as e:
        result["error"] = str(e)
    finally:
        stats.close()
        if spy is not None:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        if tracer.proc is not None:
            try:
                st = tracer.stop()
                result["events"] = st.get("events")
                result["cpu_ns"] = st.get("cpu_ns")
            except (tracers.TracerError, OSError) as e:
                result["error"] = (result.get("error", "") + f"; stop: {e}").lstrip("; ")
    if out.exists():
        result.update(fold(out.read_text(errors="replace")))
        result["raw"] = str(out)
    elif "error" not in result:
        result["error"] = f"py-spy wrote nothing ({work / f'py-spy-{build}-{mode}.stderr'})"
    return result
