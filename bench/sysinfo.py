"""The machine side of the harness: the cgroup2 mount, temporary agent cgroups, and what
/proc says about a process (CPU time, peak RSS)."""
from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """The cgroup2 mount point: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on
    hybrid ones (this project's machines)."""
    with open(mountinfo) as f:
        for lineno, line in enumerate(f, 1):
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            if right.split()[0] == "cgroup2":
                return Path(_unescape_mount(left.split()[4]))
    raise RuntimeError(f"{mountinfo}: no cgroup2 mount (the harness needs cgroup v2)")


class AgentCgroup:
    """A temporary cgroup2 directory that plays the agent cgroup. Its id (what bpftrace's
    `cgroup` builtin and agenttrace's maps hold) is the directory's inode number."""

    PREFIX = "agenttrace-bench-"

    def __init__(self, root: Path | None = None, tag: str = ""):
        self.root = root or cgroup2_mount()
        self.name = f"{self.PREFIX}{os.getpid()}{'-' + tag if tag else ''}"
        self.path = self.root / self.name
        self.id = 0

    @property
    def rel(self) -> str:
        return "/" + self.name

    def create(self) -> "AgentCgroup":
        os.mkdir(self.path)
        self.id = os.stat(self.path).st_ino
        return self

    def pids(self, path: Path | None = None) -> list[int]:
        try:
            with open((path or self.path) / "cgroup.procs") as f:
                return [int(x) for x in f.read().split()]
        except FileNotFoundError:
            return []

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left inside (everything in this cgroup was started by the harness),
        then remove the directory and any child a tracer made."""
        from agenttrace.enrich.cgroups import kill_and_remove
        kill_and_remove(self.path, timeout)

    def __enter__(self) -> "AgentCgroup":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()


def _task_ids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def process_tree(pid: int) -> list[int]:
    """pid and every live descendant."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for tid in _task_ids(p):
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except FileNotFoundError:
                pass
    return out


def cpu_ns(pids: list[int]) -> int:
    """On-CPU time (user + system) of the given processes and all their threads, in ns.

    Read from each thread's schedstat (ns resolution) rather than utime+stime in
    /proc/<pid>/stat, whose clock ticks (10 ms) are coarser than a whole tiny workload.
    Both count the same run time; stat is the fallback when schedstat is missing."""
    total = 0
    for pid in pids:
        tids = _task_ids(pid)
        got = False
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
                    got = True
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
        if not got:
            total += stat_cpu_ns(pid)
    return total


def stat_cpu_ns(pid: int) -> int:
    """utime + stime from /proc/<pid>/stat (whole thread group, exited threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLK_TCK


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def vm_hwm_kb(pid: int) -> int:
    """Peak resident set (VmHWM) in KiB; 0 for kernel threads and gone processes."""
    return _status_kb(pid, "VmHWM")


def vm_rss_kb(pid: int) -> int:
    """Resident set now (VmRSS) in KiB: beside the peak, tells a start-up spike (compiling
    probes) from a steady-state footprint."""
    return _status_kb(pid, "VmRSS")


def kernel_thread_pid(comm: str) -> int:
    """Pid of a kernel thread (child of kthreadd) with this exact comm, 0 if none.
    Read-only: used to charge kauditd's CPU to auditd, never to signal anything."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = data[data.index("(") + 1:data.rindex(")")]
        ppid = int(data[data.rindex(")") + 2:].split()[1])
        if name == comm and ppid == 2:
            return int(d)
    return 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unavailable"


def machine() -> dict:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "nproc_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu_model": cpu_model,
        "mem_total_mb": mem_kb // 1024,
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "gcc": _version(["gcc", "--version"]),
        "bpftrace": _version(["bpftrace", "--version"]),
        "auditctl": _version(["auditctl", "-v"]),
        "cgroup2_mount": str(cgroup2_mount()),
    }


# -- BPF program run-time statistics (what a tracer's probes cost inside the traced tasks)

_libc = None
_SYS_BPF = 321  # x86_64
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_ENABLE_STATS = 32
_prog_names: dict[int, str] = {}


def _cpu_busy_idle(stat: str = "/proc/stat") -> tuple[int, int]:
    f = [int(x) for x in open(stat).readline().split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)   # idle + iowait
    return sum(f) - idle, idle


def settle(max_s: float = 5.0, window_s: float = 0.2, idle_share: float = 0.9) -> dict:
    """Between two configurations, outside anything timed: write back the dirty pages the last
    one left (auditd's log: a session of it leaves tens of MB, whose writeback otherwise lands
    on the next tracer's start) and wait, at most `max_s`, for a `window_s` in which the CPUs
    were at least `idle_share` idle. Returns what it waited, for the session record."""
    t0 = time.monotonic()
    os.sync()
    synced = time.monotonic() - t0
    quiet = False
    while time.monotonic() - t0 < max_s:
        b0, i0 = _cpu_busy_idle()
        time.sleep(window_s)
        b1, i1 = _cpu_busy_idle()
        tot = (b1 - b0) + (i1 - i0)
        if tot and (i1 - i0) / tot >= idle_share:
            quiet = True
            break
    return {"sync_s": round(synced, 3), "waited_s": round(time.monotonic() - t0, 3), "quiet": quiet}


def _bpf(cmd: int, attr) -> int:
    import ctypes
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    r = _libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_long(cmd), attr, ctypes.c_long(len(attr)))
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r


def enable_bpf_stats() -> int:
    """Turn on run_time_ns/run_cnt accounting for every BPF program for as long as the returned
    fd stays open (BPF_ENABLE_STATS: nothing to restore, closing it or exiting ends it).
    Costs two clock reads per program run, for every tracer alike."""
    import ctypes
    attr = ctypes.create_string_buffer(16)  # enable_stats.type = BPF_STATS_RUN_TIME (0)
    return _bpf(_BPF_ENABLE_STATS, attr)


@contextlib.contextmanager
def bpf_stats_on(wanted: bool = True):
    """BPF run-time stats on for the with-block only, yielding whether they are: the measured
    rounds run with them off, as agenttrace ships, so each phase that reads run time turns
    them on for itself. A kernel that refuses (no CAP_SYS_ADMIN, too old) yields False."""
    fd = -1
    if wanted:
        try:
            fd = enable_bpf_stats()
        except OSError:
            fd = -1
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)


def bpf_stats_sysctl() -> str | None:
    """kernel.bpf_stats_enabled ("0" / "1"; None when unreadable). At "1" the stats are on for
    everyone whatever the fd does: a script that set it and died (bench.egress_storm, growth's
    learned-address child) would leave the stats-off repetitions with them on."""
    try:
        return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    except OSError:
        return None


def bpf_prog_name(prog_id: int) -> str:
    import ctypes
    import struct
    if prog_id in _prog_names:
        return _prog_names[prog_id]
    name = f"id{prog_id}"
    try:
        attr = ctypes.create_string_buffer(16)
        struct.pack_into("I", attr, 0, prog_id)
        fd = _bpf(_BPF_PROG_GET_FD_BY_ID, attr)
        try:
            info = ctypes.create_string_buffer(256)
            attr2 = ctypes.create_string_buffer(16)
            struct.pack_into("IIQ", attr2, 0, fd, len(info), ctypes.addressof(info))
            _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr2)
            # struct bpf_prog_info: char name[16] sits at byte 64
            raw = info.raw[64:80].split(b"\0")[0].decode(errors="replace")
            if raw:
                name = raw
        finally:
            os.close(fd)
    except OSError:
        pass
    _prog_names[prog_id] = name
    return name


def bpf_prog_stats(pids: list[int]) -> dict[int, tuple[str, int, int]]:
    """{prog_id: (name, run_cnt, run_time_ns)} for every BPF program the processes hold an fd to."""
    out = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    kv = dict(line.split(":", 1) for line in f if ":" in line)
            except (FileNotFoundError, OSError, ValueError):
                continue
            try:
                pid_ = int(kv["prog_id"])
                out[pid_] = (bpf_prog_name(pid_), int(kv.get("run_cnt", 0)), int(kv.get("run_time_ns", 0)))
            except (KeyError, ValueError):
                continue
    return out


def bpf_stats_delta(a: dict, b: dict) -> dict:
    """Per program name: runs and run time between two bpf_prog_stats() snapshots."""
    out: dict[str, dict] = {}
    for pid_, (name, cnt, ns) in b.items():
        c0, n0 = (a[pid_][1], a[pid_][2]) if pid_ in a else (0, 0)
        if cnt - c0 <= 0:
            continue
        d = out.setdefault(name, {"run_cnt": 0, "run_time_ns": 0})
        d["run_cnt"] += cnt - c0
        d["run_time_ns"] += ns - n0
    return out
