"""`agenttrace run` kept apart from the agent it starts (the agent is the adversary).

- The agent gets its own session and process group (`setsid`), so a signal it sends to its
  group (`kill -9 -$(ps -o pgid= $$)`) or that its terminal raises never reaches the tracer.
- The agent keeps the caller's stdio; the tracer writes its records to that terminal from a
  writer thread on its own descriptor (FdSink behind a QueuedSink), so an agent that stops
  the terminal's output (`tcflow(TCOOFF)`, ^S) stalls only that thread: the reader, the rules
  and the actions go on, and records the terminal cannot take are counted as sink drops.
- `--user USER` runs the command without root (groups, gid, uid of USER).
- In enforce mode the child loses CAP_NET_RAW (or what `--drop-caps` names) before exec
  (tracer/session/capdrop.py): the kernel then refuses packet and raw sockets by itself.
- In enforce mode the cgroup programs are pinned under RUN_PIN_ROOT/<agent>, so killing the
  tracer (`kill -9 $PPID`) leaves the agent's connect/flow policy in force. A normal end
  unpins; pins whose agent cgroup is gone are swept by the next `run`.
"""
from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from agenttrace.sinks.outputs import Sink

RUN_PIN_ROOT = Path("/sys/fs/bpf/agenttrace-run")


@dataclass(frozen=True)
class RunUser:
    name: str
    uid: int
    gid: int
    home: str


def resolve_user(spec: str) -> RunUser:
    """A user name or numeric uid from the password database; ValueError when unknown."""
    try:
        pw = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, OverflowError):
        raise ValueError(f"--user: no such user '{spec}'") from None
    return RunUser(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


CLONE_NEWNET = 0x40000000
_NS_GET_NSTYPE = 0xB703          # uapi linux/nsfs.h _IO(0xb7, 0x3)


def resolve_netns(spec: str) -> str:
    """`--netns NAME` (an `ip netns` name, /run/netns/NAME) or a path to a namespace file
    (/proc/PID/ns/net); ValueError naming the option when it is not a network namespace."""
    path = spec if "/" in spec else f"/run/netns/{spec}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"--netns: no network namespace '{spec}' ({path}: {e.strerror})") from None
    try:
        import fcntl
        try:
            kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
        except OSError:
            kind = None
        if kind != CLONE_NEWNET:
            raise ValueError(f"--netns: '{spec}' ({path}) is not a network namespace")
    finally:
        os.close(fd)
    return path


def agent_preexec(procs_file: str, user: Optional[RunUser] = None, drop_caps: Iterable[int] = (),
                  netns: Optional[str] = None):
    """What the forked child does before exec: join the agent cgroup (as root, so the exec
    itself is traced), leave the tracer's session, enter `netns` (before the capabilities go:
    setns needs CAP_SYS_ADMIN, which enforce mode takes away), give up `drop_caps` (while
    still root: the bounding-set drop needs CAP_SETPCAP), then drop to `user`."""
    caps = list(drop_caps)

    def preexec() -> None:
        with open(procs_file, "w") as f:
            f.write("0")
        os.setsid()
        if netns is not None:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
        if caps:
            from agenttrace.session.capdrop import drop
            drop(caps)
        if user is not None:
            os.initgroups(user.name, user.gid)
            os.setgid(user.gid)
            os.setuid(user.uid)

    return preexec


def user_env(user: Optional[RunUser], env: Optional[dict] = None) -> Optional[dict]:
    if user is None:
        return env
    e = dict(os.environ if env is None else env)
    e.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    return e


class FdSink(Sink):
    """JSON lines written with os.write to a private duplicate of a descriptor (stdout).

    No buffered Python stream: a write blocked by the agent (a stopped terminal) holds no
    lock anything else needs, and closing never waits for it."""

    def __init__(self, fd: int = 1, formatter=None, name: str = "stdout"):
        super().__init__(name, formatter)
        self._fd = os.dup(fd)
        os.set_inheritable(self._fd, False)
        self._broken = False

    def emit_batch(self, records: Iterable[dict]) -> None:
        lines = []
        for r in records:
            try:
                lines.append(self._line(r))
            except Exception:
                self.dropped += 1
        if not lines:
            return
        if self._broken:
            self.dropped += len(lines)
            return
        data = memoryview(b"".join(lines))
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            # a closed pipe (`agenttrace run | head`) ends this sink, not the tracer
            self._broken = True
            self.dropped += bytes(data).count(b"\n")

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def stdout_sink(formatter=None):
    """The caller's stdout for `run`, off the reader's thread. Closing waits briefly: a
    stopped terminal must not keep the run from ending (what it never took is counted)."""
    from agenttrace.sinks.outputs import QueuedSink
    q = QueuedSink(FdSink(1, formatter))
    q.close_timeout = 2.0
    return q


def run_pin_dir(agent_name: str) -> Path:
    return RUN_PIN_ROOT / agent_name


def _pinned_by_live_tracer(d: Path) -> bool:
    """A pin's name ends with its tracer's pid (Probes.enable_pinning): a folder with a pin of a
    live process is that tracer's own, being filled or in use."""
    for f in d.iterdir():
        pid = f.name.rpartition("-")[2]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                return True
            except ProcessLookupError:
                continue
            except PermissionError:
                return True
    return False


def sweep_stale_pins(cgroup_parent: Path) -> list[str]:
    """Remove pins of earlier `run -- CMD` runs whose agent cgroup no longer holds a process.

    Never a `run --cgroup` folder (`cgroups-*`): its pins are the fail-closed state of a killed
    tracer and stay until a run on the same cgroups replaces them (remove_foreign_pins). Never a
    folder a live tracer pins into: a concurrent run between pinning and starting its command
    has an empty cgroup too. Another run may remove folders (or the root) meanwhile."""
    from agenttrace.enrich.cgroups import procs
    removed = []
    try:
        dirs = list(RUN_PIN_ROOT.iterdir())
    except OSError:
        return removed
    for d in dirs:
        if d.name.startswith("cgroups-"):
            continue
        cg = cgroup_parent / d.name
        try:
            if cg.is_dir() and procs(cg):
                continue      # the agent outlived its tracer: its enforcement stays
        except OSError:
            pass
        try:
            if _pinned_by_live_tracer(d):
                continue
            files = list(d.iterdir())
        except OSError:
            continue          # removed by another run meanwhile
        for f in files:
            try:
                f.unlink()
            except OSError:
                pass
        try:
            d.rmdir()
            removed.append(d.name)
        except OSError:
            pass
    return removed
