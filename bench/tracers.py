"""The tracer configurations compared in one run: none, agenttrace (monitor, enforce),
bpftrace (two probe choices) and auditd.

Every tracer is a session: start (ready = it will see the next event), marks taken around each
workload (CPU time of the tracer's processes and how far its output had got), stop (peak RSS,
final counters, everything it wrote). Output is analysed after the session so that parsing
never competes with the workload for the two CPUs."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import loadgen, sysinfo
from .tap import LineTap

REPO = Path(__file__).resolve().parent.parent
AUDIT_KEY = "agenttrace-bench"
SYSCALL_NR = {59: "exec", 42: "connect"}  # x86_64


class TracerError(RuntimeError):
    pass


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def _stop_pid(proc: subprocess.Popen, sig: int, timeout: float) -> str:
    """Signal our own child by pid and reap it; SIGKILL if it does not go. Returns how it ended."""
    if proc.poll() is not None:
        return f"exited {proc.returncode}"
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
        return f"stopped by {signal.Signals(sig).name}, exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return f"did not stop on {signal.Signals(sig).name} within {timeout:.0f} s; killed"


class Tracer:
    name = "?"
    family = "?"
    description = ""
    scope = ""
    latency_clock = None  # "wall" or "mono" when the output carries a kernel timestamp

    def __init__(self):
        self.startup_s = 0.0
        self.proc: subprocess.Popen | None = None

    def unavailable(self) -> str | None:
        return None

    # -- session
    def start(self, cg: sysinfo.AgentCgroup, workdir: Path, gens: dict) -> None:
        pass

    def pids(self) -> list[int]:
        return sysinfo.process_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def cpu_ns(self) -> int:
        return sysinfo.cpu_ns(self.pids())

    def mark(self):
        return 0

    def drain(self, since, expected: int, quiet: float = 0.25, timeout: float = 20.0) -> None:
        pass

    def stop(self) -> dict:
        return {}

    def window(self, a, b) -> dict:
        """What the tracer reported between two marks: events, events by kind, latencies."""
        return {"events": 0, "by_kind": {}, "latency_ns": []}

    def alive_check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise TracerError(f"{self.name} exited with {self.proc.returncode} during the session")


class NoTracer(Tracer):
    name = "none"
    family = "none"
    description = "no tracer: the baseline every ratio divides by"
    scope = "-"


def _canary(gens: dict, cg: sysinfo.AgentCgroup) -> None:
    loadgen.run(gens["exec_storm"], [1], cg.path, timeout=30)


class _TapTracer(Tracer):
    """A tracer whose output is a line stream read by a LineTap."""

    def __init__(self):
        super().__init__()
        self.tap: LineTap | None = None
        self.err_path: Path | None = None

    def mark(self):
        """(lines so far, events so far): window() slices by the first, drain() counts by the second."""
        return (len(self.tap.lines), self.tap.events) if self.tap else (0, 0)

    def drain(self, since, expected: int, quiet: float = 0.25, timeout: float = 20.0) -> None:
        if self.tap:
            self.tap.wait_quiet(quiet, timeout, at_least=since[1] + expected)


class Bpftrace(_TapTracer):
    family = "bpftrace"
    latency_clock = "mono"
    VARIANTS = {
        # Same hook classes agenttrace is designed around (sched + sock tracepoints): nothing on
        # the syscall path of processes outside the agent cgroup.
        "bpftrace": (
            "sched:sched_process_exec + sock:inet_sock_set_state (TCP, newstate SYN_SENT): "
            "exec filename, connect destination",
            """tracepoint:sched:sched_process_exec /cgroup == {cg}/ {{
  printf("%llu exec %d %s\\n", nsecs, pid, str(args->filename));
}}
tracepoint:sock:inet_sock_set_state /cgroup == {cg} && args->newstate == 2 && args->protocol == 6/ {{
  printf("%llu connect %d %s %d\\n", nsecs, pid, ntop(args->daddr), args->dport);
}}
"""),
        # The brief's other option and the docs/ARCHITECTURE.md §4 baseline: a syscalls:* tracepoint puts
        # every task on the slow syscall path, so the untraced workloads pay for it.
        "bpftrace-syscalls": (
            "sched:sched_process_exec + syscalls:sys_enter_connect (sockaddr read from user memory): "
            "exec filename, connect destination",
            """#include <linux/in.h>
tracepoint:sched:sched_process_exec /cgroup == {cg}/ {{
  printf("%llu exec %d %s\\n", nsecs, pid, str(args->filename));
}}
tracepoint:syscalls:sys_enter_connect /cgroup == {cg}/ {{
  $sa = (struct sockaddr_in *)args->uservaddr;
  printf("%llu connect %d %s %d\\n", nsecs, pid, ntop($sa->sin_addr.s_addr),
         (($sa->sin_port & 0xff) << 8) | ($sa->sin_port >> 8));
}}
"""),
    }

    def __init__(self, variant: str = "bpftrace"):
        super().__init__()
        self.name = variant
        self.description, self.template = self.VARIANTS[variant]
        self.scope = "agent cgroup only: predicate `cgroup == <id>` (bpf_get_current_cgroup_id, the cgroup dir inode)"
        self.lost = 0

    def unavailable(self) -> str | None:
        if shutil.which("bpftrace") is None:
            return "bpftrace not installed"
        if os.geteuid() != 0:
            return "needs root"
        return None

    def start(self, cg, workdir, gens) -> None:
        script = workdir / f"{self.name}.bt"
        script.write_text(self.template.format(cg=cg.id))
        self.err_path = workdir / f"{self.name}.stderr"
        t0 = time.monotonic()
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(["bpftrace", str(script)], stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.tap = LineTap(self.proc.stdout.fileno(), is_event=lambda l: l[:1].isdigit())
        # bpftrace's BEGIN fires before the other probes are attached, so "ready" is taken as
        # the moment a canary exec in the agent cgroup comes out of it.
        deadline = t0 + 60
        while self.tap.events == 0:
            if self.proc.poll() is not None:
                raise TracerError(f"bpftrace exited {self.proc.returncode}: {_tail(self.err_path)}")
            if time.monotonic() > deadline:
                raise TracerError("bpftrace printed no canary exec within 60 s")
            _canary(gens, cg)
            self.tap.wait_for(lambda t: t.events > 0, 0.2)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> dict:
        rss = max((sysinfo.vm_hwm_kb(p) for p in self.pids()), default=0)
        rss_now = sum(sysinfo.vm_rss_kb(p) for p in self.pids())
        cpu = self.cpu_ns()
        how = _stop_pid(self.proc, signal.SIGINT, 15)
        self.tap.close()
        self.proc.stdout.close()
        err = _tail(self.err_path, 4000)
        self.lost = sum(int(m) for m in re.findall(r"Lost (\d+) events", err))
        return {"rss_hwm_kb": rss, "rss_end_kb": rss_now, "cpu_ns": cpu, "events": self.tap.events,
                "drops": self.lost, "end": how}

    def window(self, a, b) -> dict:
        by_kind: dict[str, int] = {}
        lat = []
        for _, mono, line in self.tap.lines[a[0]:b[0]]:
            parts = line.split(b" ", 3)
            if len(parts) < 3 or not parts[0].isdigit():
                continue
            kind = parts[1].decode()
            by_kind[kind] = by_kind.get(kind, 0) + 1
            lat.append(mono - int(parts[0]))
        return {"events": sum(by_kind.values()), "by_kind": by_kind, "latency_ns": lat}


# The "before" build of a before/after run (`--before PATH` or $BENCH_AGENTTRACE_BEFORE):
# tracer names agenttrace-before-<mode> run it, with the same arguments as the build under test.
BEFORE: dict = {"exe": os.environ.get("BENCH_AGENTTRACE_BEFORE") or None}


def agenttrace_exe(build: str = "after") -> Path | None:
    """$BENCH_AGENTTRACE (to compare two builds), else the venv's console script; for
    build "before", the --before executable."""
    if build == "before":
        return Path(BEFORE["exe"]) if BEFORE.get("exe") else None
    if os.environ.get("BENCH_AGENTTRACE"):
        return Path(os.environ["BENCH_AGENTTRACE"])
    for cand in (Path(sys.prefix) / "bin" / "agenttrace", REPO / ".venv" / "bin" / "agenttrace"):
        if cand.exists():
            return cand
    w = shutil.which("agenttrace")
    return Path(w) if w else None


_AGENTTRACE_CHECK: dict = {}


def agenttrace_unavailable(build: str = "after") -> str | None:
    """Why `agenttrace run` of that build cannot be benchmarked (None when it can). Checked
    once per executable and run."""
    exe = agenttrace_exe(build)
    if str(exe) in _AGENTTRACE_CHECK:
        return _AGENTTRACE_CHECK[str(exe)]
    reason = None
    if exe is None:
        reason = ("no before build given (--before PATH or $BENCH_AGENTTRACE_BEFORE)" if build == "before"
                  else "no agenttrace executable (install with scripts/setup.sh)")
    elif not os.access(exe, os.X_OK):
        reason = f"{exe} is not an executable file"
    elif os.geteuid() != 0:
        reason = "needs root to load probes"
    else:
        try:
            r = subprocess.run([str(exe), "run", "--help"], capture_output=True, text=True, timeout=60)
            text = r.stdout + r.stderr
            missing = [o for o in ("--cgroup", "--output", "--mode") if o not in text]
            if r.returncode != 0:
                last = (text.strip().splitlines() or ["no output"])[-1]
                reason = f"`agenttrace run --help` exit {r.returncode}: {last[:200]}"
            elif missing:
                reason = f"`agenttrace run --help` lists no {', '.join(missing)}"
        except (OSError, subprocess.SubprocessError) as e:
            reason = f"`agenttrace run --help` failed: {e}"
    _AGENTTRACE_CHECK[str(exe)] = reason
    return reason


def _json(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


_TS_CACHE: dict[str, int] = {}


def parse_ts_ns(ts: str) -> int:
    """RFC 3339 UTC with up to 9 fraction digits ('2026-11-27T07:30:00.123456789Z') → epoch ns.
    The seconds part repeats across thousands of lines, so its conversion is cached."""
    import calendar
    if ts.endswith("Z"):
        ts = ts[:-1]
    elif ts.endswith("+00:00"):
        ts = ts[:-6]
    else:
        raise ValueError(f"not a UTC RFC 3339 timestamp: {ts!r}")
    base, _, frac = ts.partition(".")
    sec = _TS_CACHE.get(base)
    if sec is None:
        sec = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
        _TS_CACHE[base] = sec
    return sec * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


def drops_total(d) -> int | None:
    """Events lost anywhere: the `stopped` record's drops are a number or, as agenttrace writes
    them, {"kernel": n, "kernel_by_agent": {..}, "kernel_by_type": {..}, "sinks": {name: n}, ...}
    where the *_by_* maps (kernel_by_agent, rate_limited_by_agent, kernel_by_type) break
    `kernel` down and must not be added again."""
    if d is None or isinstance(d, bool):
        return None
    if isinstance(d, (int, float)):
        return int(d)
    if isinstance(d, dict):
        total = 0
        for k, v in d.items():
            if "_by_" in k or k in ("stage_errors", "unknown_records"):
                continue
            sub = drops_total(v)
            total += sub or 0
        return total
    return None


class Agenttrace(_TapTracer):
    family = "agenttrace"
    latency_clock = "wall"

    def __init__(self, mode: str, wakeup_ms: str | None = None, build: str = "after",
                 extra_args: list | None = None, label: str = ""):
        super().__init__()
        self.mode = mode
        self.build = build
        # `agenttrace-<mode>-wake<ms>`: the same build with another ring-buffer wakeup interval,
        # for before/after figures in one run (wake0 = a reader wakeup on every record)
        self.extra = ([] if wakeup_ms is None else ["--wakeup-ms", wakeup_ms]) + list(extra_args or [])
        self.name = ("agenttrace-" + ("before-" if build == "before" else "") + mode
                     + ("" if wakeup_ms is None else f"-wake{wakeup_ms}"))
        shown = " " + label if label else "".join(" " + a for a in self.extra)
        self.description = (f"`agenttrace run --cgroup <agent cgroup> --mode {mode} --output <fifo>{shown}`"
                            + (f" of the before build ({agenttrace_exe('before')})" if build == "before" else "")
                            + ", every default probe, default rule pack: every event kind it emits "
                            "(exec, fork, exit, connect, ...)")
        self.started: dict = {}  # the lifecycle/started record (probes loaded, startup_ms)
        self.scope = "agent cgroup (and descendants) via its watched-cgroup map"
        self.fifo_fd = -1
        self.counters: dict = {}
        self._n = 0

    def unavailable(self) -> str | None:
        return agenttrace_unavailable(self.build)

    @staticmethod
    def _is_event(line: bytes) -> bool:
        return b'"lifecycle"' not in line and line.strip() != b""

    def start(self, cg, workdir, gens) -> None:
        self._n += 1
        fifo = workdir / f"{self.name}-{self._n}.fifo"
        if fifo.exists():
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        # O_RDWR: opening never blocks and the pipe never reports EOF while we hold it, whatever
        # the tracer does with its end (open late, reopen, close on exit).
        self.fifo_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.tap = LineTap(self.fifo_fd, is_event=self._is_event)
        self.err_path = workdir / f"{self.name}-{self._n}.stderr"
        cmd = [str(agenttrace_exe(self.build)), "run", "--cgroup", str(cg.path), "--mode", self.mode, "--output", str(fifo),
               *self.extra]
        t0_wall = time.time_ns()
        t0 = time.monotonic()
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = t0 + 120
        while True:
            started = self._find_lifecycle("started")
            if started is not None:
                self.startup_s = (started[0] - t0_wall) / 1e9
                self.started = {k: started[1].get(k) for k in ("probes", "startup_ms", "version", "watched", "probe_cache", "native")
                                if k in started[1]}
                self._settle()
                return
            if self.proc.poll() is not None:
                raise TracerError(f"agenttrace exited {self.proc.returncode} before `started`: {_tail(self.err_path)}")
            if time.monotonic() > deadline:
                raise TracerError("agenttrace wrote no lifecycle/started record within 120 s")
            self.tap.wait_for(lambda t: t.count > 0, 0.1)

    def _settle(self, idle_ns_per_100ms: int = 3_000_000, limit_s: float = 5.0) -> None:
        """Wait until the tracer is idle after `started`: work it does after that record (the
        identity cache's reads, the GPU sampler's start) is start-up cost, not the first
        workload's. Both figures are kept: `settle_s` (started → idle) and `settle_cpu_ms` (the
        tracer CPU spent meanwhile), and the report states them beside the start goal."""
        t0, c0 = time.monotonic(), self.cpu_ns()
        prev = c0
        while time.monotonic() - t0 < limit_s:
            time.sleep(0.1)
            c = self.cpu_ns()
            if c - prev < idle_ns_per_100ms:
                break
            prev = c
        self.started["settle_s"] = round(time.monotonic() - t0, 3)
        self.started["settle_cpu_ms"] = round((self.cpu_ns() - c0) / 1e6, 1)

    def _find_lifecycle(self, phase: str):
        for wall, _, line in self.tap.lines:
            if b'"lifecycle"' in line and phase.encode() in line:
                rec = _json(line)
                if rec and rec.get("kind") == "lifecycle" and rec.get("phase") == phase:
                    return wall, rec
        return None

    def stop(self) -> dict:
        rss = max((sysinfo.vm_hwm_kb(p) for p in self.pids()), default=0)
        rss_now = sum(sysinfo.vm_rss_kb(p) for p in self.pids())
        cpu = self.cpu_ns()
        how = _stop_pid(self.proc, signal.SIGINT, 30)
        self.tap.close()
        os.close(self.fifo_fd)
        stopped = self._find_lifecycle("stopped")
        counters = {}
        if stopped:
            rec = stopped[1]
            src = rec.get("counters") if isinstance(rec.get("counters"), dict) else rec
            counters = {k: src.get(k) for k in ("events", "drops", "alerts") if k in src}
        self.counters = counters
        return {"rss_hwm_kb": rss, "rss_end_kb": rss_now, "cpu_ns": cpu, "events": self.tap.events, "end": how,
                "stopped_record": bool(stopped), "counters": counters,
                "drops": drops_total(counters.get("drops")) if stopped else None,
                "stderr_tail": _tail(self.err_path) if not stopped else ""}

    def window(self, a, b) -> dict:
        by_kind: dict[str, int] = {}
        lat = []
        for wall, _, line in self.tap.lines[a[0]:b[0]]:
            if not self._is_event(line):
                continue
            rec = _json(line)
            if not isinstance(rec, dict):
                by_kind["unparsable"] = by_kind.get("unparsable", 0) + 1
                continue
            kind = str(rec.get("kind"))
            by_kind[kind] = by_kind.get(kind, 0) + 1
            if kind in ("exec", "connect") and isinstance(rec.get("ts"), str):
                try:
                    lat.append(wall - parse_ts_ns(rec["ts"]))
                except ValueError:
                    pass
        return {"events": sum(by_kind.values()), "by_kind": by_kind, "latency_ns": lat}


def _auditctl(*args: str, check: bool = True) -> str:
    r = subprocess.run(["auditctl", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise TracerError(f"auditctl {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def audit_status() -> dict:
    out = {}
    for line in _auditctl("-s").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = parts[1]
    return out


class Auditd(Tracer):
    name = "auditd"
    family = "auditd"
    description = (f"auditd: `-a always,exit -F arch=b64 -S execve -S connect -F auid={loadgen.BENCH_AUID} "
                   f"-k {AUDIT_KEY}`; events = SYSCALL records with the key")
    scope = (f"audit rules cannot filter on cgroups; scoped by login uid (auid={loadgen.BENCH_AUID}, which "
             "every process in the agent cgroup is given). The filter runs in the kernel's syscall-exit "
             "path of every task, so the untraced workloads still pay for evaluating it")
    RULE = ["always,exit", "-F", "arch=b64", "-S", "execve", "-S", "connect", "-F", f"auid={loadgen.BENCH_AUID}",
            "-k", AUDIT_KEY]

    def __init__(self):
        super().__init__()
        self.own_daemon = False
        self.daemon_pid = 0
        self.kauditd = 0
        self.log_path: Path | None = None
        self.saved: dict = {}
        self.rule_added = False
        self.lost0 = 0
        self._log_fh = None
        self._offset = 0
        self._lines: list[bytes] = []  # matching SYSCALL lines, in order; marks index into it
        self._partial = b""

    def unavailable(self) -> str | None:
        for tool in ("auditctl", "auditd"):
            if shutil.which(tool) is None:
                return f"{tool} not installed"
        if os.geteuid() != 0:
            return "needs root"
        try:
            audit_status()
        except (OSError, subprocess.SubprocessError, TracerError) as e:
            return f"kernel audit not usable: {e}"
        return None

    def _existing_log(self) -> Path:
        log = Path("/var/log/audit/audit.log")
        try:
            for line in Path("/etc/audit/auditd.conf").read_text().splitlines():
                k, _, v = line.partition("=")
                if k.strip() == "log_file":
                    log = Path(v.strip())
        except OSError:
            pass
        return log

    def _write_conf(self, confdir: Path) -> None:
        confdir.mkdir(mode=0o750, parents=True, exist_ok=True)
        (confdir / "plugins.d").mkdir(mode=0o750, exist_ok=True)
        base = {}
        try:
            for line in Path("/etc/audit/auditd.conf").read_text().splitlines():
                k, sep, v = line.partition("=")
                if sep and not k.strip().startswith("#"):
                    base[k.strip()] = v.strip()
        except OSError:
            pass
        # The system's settings (Debian: ENRICHED log format, incremental async flush) so the
        # daemon costs what it costs in production; only where it writes and what it loads differ.
        base.update({"log_file": str(self.log_path), "plugin_dir": str(confdir / "plugins.d"),
                     "max_log_file_action": "IGNORE", "space_left_action": "IGNORE",
                     "admin_space_left_action": "IGNORE", "disk_full_action": "IGNORE",
                     "disk_error_action": "IGNORE", "log_group": "root"})
        for k in ("tcp_listen_port", "krb5_principal", "krb5_key_file"):
            base.pop(k, None)
        conf = confdir / "auditd.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in base.items()))
        os.chmod(conf, 0o640)

    def start(self, cg, workdir, gens) -> None:
        t0 = time.monotonic()
        st = audit_status()
        pid = int(st.get("pid", "0"))
        self.saved = {"enabled": st.get("enabled", "0"), "backlog_limit": st.get("backlog_limit"),
                      "backlog_wait_time": st.get("backlog_wait_time")}
        if pid and sysinfo.alive(pid):
            # Somebody's auditd is already running: use it and leave it running.
            self.daemon_pid = pid
            self.log_path = self._existing_log()
        else:
            confdir = workdir / "auditd"
            self.log_path = confdir / "audit.log"
            self._write_conf(confdir)
            if self.log_path.exists():
                self.log_path.unlink()
            with open(workdir / "auditd.stderr", "wb") as err:
                self.proc = subprocess.Popen(["auditd", "-n", "-s", "enable", "-c", str(confdir)],
                                             stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                             start_new_session=True)
            self.own_daemon = True
            self.daemon_pid = self.proc.pid
            deadline = time.monotonic() + 20
            while audit_status().get("pid") != str(self.proc.pid):
                if self.proc.poll() is not None:
                    raise TracerError(f"auditd exited {self.proc.returncode}: {_tail(workdir / 'auditd.stderr')}")
                if time.monotonic() > deadline:
                    raise TracerError("auditd did not register with the kernel within 20 s")
                time.sleep(0.05)
            # What Debian's /etc/audit/rules.d/audit.rules sets; the kernel default backlog of
            # 64 would make every traced exec wait for the daemon.
            _auditctl("-b", "8192", "--backlog_wait_time", "60000")
        if audit_status().get("enabled") != "1":
            _auditctl("-e", "1")
        self.lost0 = int(audit_status().get("lost", "0"))
        self._open_log()
        _auditctl("-a", *self.RULE)
        self.rule_added = True
        self.kauditd = sysinfo.kernel_thread_pid("kauditd")
        deadline = time.monotonic() + 30
        n0 = len(self._lines)
        while len(self._lines) == n0:
            if time.monotonic() > deadline:
                raise TracerError(f"auditd logged no canary execve within 30 s ({self.log_path})")
            _canary(gens, cg)
            end = time.monotonic() + 0.5
            while time.monotonic() < end and len(self._lines) == n0:
                self._read_log()
                time.sleep(0.02)
        self.startup_s = time.monotonic() - t0

    def _open_log(self) -> None:
        deadline = time.monotonic() + 10
        while not self.log_path.exists():
            if time.monotonic() > deadline:
                raise TracerError(f"audit log {self.log_path} never appeared")
            time.sleep(0.05)
        self._log_fh = open(self.log_path, "rb")
        self._log_fh.seek(0, os.SEEK_END)

    def _read_log(self) -> int:
        chunk = self._log_fh.read()
        if chunk:
            data = self._partial + chunk
            lines = data.split(b"\n")
            self._partial = lines.pop()
            key = f'key="{AUDIT_KEY}"'.encode()
            self._lines.extend(l for l in lines if l.startswith(b"type=SYSCALL") and key in l)
        return len(self._lines)

    def pids(self) -> list[int]:
        return [p for p in (self.daemon_pid, self.kauditd) if p and sysinfo.alive(p)]

    def mark(self):
        """(records so far, wall time): window() also drops records stamped before the first
        mark's time. The kernel keeps undelivered records queued across an auditd restart and
        hands them to the next daemon, so a late record of an earlier session must not be
        counted for the workload that happens to be running when it arrives."""
        self._read_log()
        return (len(self._lines), time.time_ns())

    def drain(self, since, expected: int, quiet: float = 0.6, timeout: float = 20.0) -> None:
        # quiet is longer than for the pipe tracers: auditd writes its log asynchronously
        # (flush = INCREMENTAL_ASYNC), and a record flushed late would land in the next window
        deadline = time.monotonic() + timeout
        last, last_change = self._read_log(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            n = self._read_log()
            if n != last:
                last, last_change = n, time.monotonic()
            if n - since[0] >= expected and time.monotonic() - last_change >= quiet:
                return

    def window(self, a, b) -> dict:
        by_kind: dict[str, int] = {}
        for line in self._lines[a[0]:b[0]]:
            t = re.search(rb"audit\((\d+)\.(\d+):", line)
            # audit stamps have ms resolution: allow one tick of slack before the window opened
            if t and int(t.group(1)) * 1_000_000_000 + int(t.group(2)) * 1_000_000 < a[1] - 2_000_000:
                by_kind["stale"] = by_kind.get("stale", 0) + 1
                continue
            m = re.search(rb" syscall=(\d+)", line)
            kind = SYSCALL_NR.get(int(m.group(1)), "other") if m else "other"
            by_kind[kind] = by_kind.get(kind, 0) + 1
        return {"events": sum(v for k, v in by_kind.items() if k != "stale"), "by_kind": by_kind, "latency_ns": []}

    def stop(self) -> dict:
        rss = sysinfo.vm_hwm_kb(self.daemon_pid)
        rss_now = sysinfo.vm_rss_kb(self.daemon_pid)
        cpu = self.cpu_ns()
        errors = []
        lost = None
        try:
            lost = int(audit_status().get("lost", "0")) - self.lost0
        except TracerError as e:
            errors.append(str(e))
        if self.rule_added:
            try:
                _auditctl("-d", *self.RULE)
                self.rule_added = False
            except TracerError as e:
                errors.append(str(e))
        if self._log_fh:
            self._read_log()
            self._log_fh.close()
        how = "left running (not ours)"
        if self.own_daemon and self.proc is not None:
            how = _stop_pid(self.proc, signal.SIGTERM, 20)
        try:
            restore = []
            if self.own_daemon and self.saved.get("backlog_limit"):
                restore += ["-b", self.saved["backlog_limit"]]
            if self.own_daemon and self.saved.get("backlog_wait_time"):
                restore += ["--backlog_wait_time", self.saved["backlog_wait_time"]]
            if audit_status().get("enabled") != self.saved.get("enabled"):
                restore += ["-e", self.saved.get("enabled", "0")]
            if restore:
                _auditctl(*restore)
        except TracerError as e:
            errors.append(str(e))
        if errors:
            raise TracerError("; ".join(errors))
        return {"rss_hwm_kb": rss, "rss_end_kb": rss_now, "cpu_ns": cpu, "events": len(self._lines), "drops": lost,
                "end": how,
                "log": str(self.log_path)}


def make(name: str) -> Tracer:
    if name == "none":
        return NoTracer()
    if name in Bpftrace.VARIANTS:
        return Bpftrace(name)
    if name == "auditd":
        return Auditd()
    m = _AGENTTRACE_NAME.fullmatch(name)
    if m:
        return Agenttrace(m.group(2), m.group(3), build="before" if m.group(1) else "after")
    raise ValueError(name)


_AGENTTRACE_NAME = re.compile(r"agenttrace-(before-)?(monitor|enforce)(?:-wake(\d+(?:\.\d+)?))?")


ALIASES = {"agenttrace": ["agenttrace-monitor", "agenttrace-enforce"]}
KNOWN = ["none", "agenttrace-monitor", "agenttrace-enforce", "agenttrace-before-monitor", "agenttrace-before-enforce",
         "bpftrace", "bpftrace-syscalls", "auditd"]


def expand(names: list[str]) -> list[str]:
    out = []
    for n in names:
        for m in ALIASES.get(n, [n]):
            if m not in KNOWN and not _AGENTTRACE_NAME.fullmatch(m):
                raise ValueError(f"unknown tracer {n!r}; known: {', '.join(KNOWN + list(ALIASES))}")
            if m not in out:
                out.append(m)
    if "none" not in out:
        out.insert(0, "none")  # every ratio needs the baseline from the same run
    return out
