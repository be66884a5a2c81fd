"""Start-up cost of `agenttrace run -- CMD` and of a daemon start: time from exec to the
`lifecycle/started` record, the tracer's peak RSS (VmHWM) and its CPU time.

    python bench/profiles/startup.py [--rounds N] [--tree DIR]...

Each --tree is a checkout of the project (default: this one) run through its own package
(PYTHONPATH pointed at a link named agenttrace to its tracer/), rounds rotated across trees so
load on a shared machine hits all alike; `DIR@K=V,K=V` runs that tree with those environment
variables (e.g. `.@AGENTTRACE_PREFETCH=off`). Figures are per tree: median and max. docs/STARTUP.md
has the breakdown these were taken with.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]


PYC = False


def _split(spec) -> tuple[Path, dict]:
    text = str(spec)
    path, _, extra = text.partition("@")
    return Path(path).resolve(), dict(kv.split("=", 1) for kv in extra.split(",") if kv)


def _env(tree, tmp: Path) -> dict:
    tree, extra = _split(tree)
    env = dict(os.environ)
    env.update(extra)
    if PYC:
        # as installed (a wheel or the .deb has bytecode): sources compiled once, not per start
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    if tree != HERE:
        link = tmp / f"pkg-{abs(hash(str(tree)))}"
        link.mkdir(exist_ok=True)
        if not (link / "agenttrace").exists():
            (link / "agenttrace").symlink_to(tree / "tracer")
        env["PYTHONPATH"] = str(link)
    return env


def _watch(cmd: list[str], env: dict, started_in: Path | None) -> dict:
    """Run cmd; the time at which a `started` record appears (on stdout, or in started_in)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = None
    hwm = 0
    if started_in is None:
        for line in p.stdout:
            if started is None and '"started"' in line:
                started = time.monotonic() - t0
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    else:
        # no p.poll() here: it would reap the child before wait4 can read its usage
        while time.monotonic() - t0 < 120 and os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if started_in.exists() and '"started"' in started_in.read_text():
                started = time.monotonic() - t0
                break
            time.sleep(0.01)
        try:
            hwm = int([l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmHWM:")][0].split()[1])
        except (OSError, IndexError):
            pass
        try:
            os.kill(p.pid, 15)      # not p.terminate(): it polls, and a poll reaps an exited child
        except ProcessLookupError:
            pass
    _pid, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"started_s": started, "rss_mb": hwm / 1024, "cpu_s": ru.ru_utime + ru.ru_stime,
            "wall_s": time.monotonic() - t0, "rc": p.returncode,
            "err": p.stderr.read()[-500:] if p.returncode not in (0, -15) else ""}


def run_once(tree: Path, tmp: Path) -> dict:
    exe = str(Path(sys.executable).with_name("agenttrace"))
    # the command reports the tracer's (its parent's) peak RSS once the tracer has started
    return _watch([exe, "run", "--", "sh", "-c", "grep VmHWM /proc/$PPID/status"], _env(tree, tmp), None)


def daemon_once(tree: Path, tmp: Path) -> dict:
    exe = str(Path(sys.executable).with_name("agenttrace"))
    d = Path(tempfile.mkdtemp(dir=tmp))
    cg = Path("/sys/fs/cgroup") / f"at-startup-{os.getpid()}"
    cg.mkdir(exist_ok=True)
    out = d / "events.jsonl"
    cfg = d / "agenttrace.yaml"
    cfg.write_text(textwrap.dedent(f"""
        mode: monitor
        agents:
          - cgroup: /{cg.name}
        sinks:
          stdout: false
          file: {{path: {out}}}
          socket: {{path: {d / "events.sock"}}}
    """))
    try:
        return _watch([exe, "daemon", "--config", str(cfg)], _env(tree, tmp), out)
    finally:
        cg.rmdir()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", action="append", type=str)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--pyc", action="store_true",
                    help="let Python keep bytecode (a temporary PYTHONPYCACHEPREFIX), as an install does")
    a = ap.parse_args()
    global PYC
    PYC = a.pyc
    trees = a.tree or [str(HERE)]
    res: dict = {str(t): {"run": [], "daemon": []} for t in trees}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            for t in trees:
                res[str(t)]["run"].append(run_once(t, Path(tmp)))
                res[str(t)]["daemon"].append(daemon_once(t, Path(tmp)))
    for t, kinds in res.items():
        for kind, rs in kinds.items():
            ok = [r for r in rs if r["started_s"] is not None]
            if not ok:
                print(f"{t} {kind}: no started record: {rs[-1]}")
                continue
            s = [r["started_s"] for r in ok]
            m = [r["rss_mb"] for r in ok]
            c = [r["cpu_s"] for r in ok]
            print(f"{t} {kind}: start->started median {statistics.median(s):.2f} s (max {max(s):.2f}), "
                  f"peak RSS max {max(m):.0f} MB, CPU median {statistics.median(c):.2f} s, n={len(ok)}")
    print("load average (1, 5, 15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f" % (load0 + os.getloadavg()))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
