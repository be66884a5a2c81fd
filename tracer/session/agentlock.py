"""One `agenttrace run -- CMD` per agent name at a time.

A run's agent is the cgroup <cgroup2>/agenttrace/<name>, and its end kills whatever is left in
that cgroup (runner.run_command). Two runs given the same `--agent` used to share the cgroup,
and the first to end killed the other's command (exit 137: two test suites on one machine,
each running the same `--agent sneaky-enforce` test). A run now holds its name with a lock
for its whole life; a second run of that name is refused before anything starts.

flock, not a pid written in a file: the kernel drops the lock when its holder dies, however it
dies, and a pid left behind by a dead run could name a live process once pids wrap. The file
is removed at the end, under the lock; whoever locked a file that was removed meanwhile (it
opened the old one) sees the path no longer names it and tries again.

A run killed with SIGKILL cannot remove its file. The lock is gone with it, so the file does no
harm to the next run of that name, but it is left behind; each run therefore sweeps the folder
when it starts: a file nobody holds and nobody has written for STALE_AFTER_S is removed, under
its lock. The age keeps the sweep off a file another run has just opened and not yet locked,
and a run whose lock attempt lands in a sweeper's brief hold looks again (below) instead of
taking the sweeper for an owner."""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_ROOT = Path("/run/agenttrace-run")
STALE_AFTER_S = 10.0
# how long a lock attempt that failed keeps looking for a sweeper's removal (a sweeper holds a
# file for an unlink's time); a real owner holds it for its whole run
_SWEEP_GRACE_S = 0.2


class AgentInUse(Exception):
    pass


class AgentLock:
    def __init__(self, name: str, root: Path = LOCK_ROOT):
        self.name = name
        self.path = root / f"{name}.lock"      # the CLI allows only a cgroup directory name
        self.fd = -1

    def acquire(self) -> "AgentLock":
        while True:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                continue            # the folder went with another run's end: make it again
            held = _lock_or_swept(fd, self.path)
            if held is None:
                os.close(fd)
                continue            # a sweeper removed the file we opened: make it again
            if not held:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise AgentInUse(
                    f"--agent: agent '{self.name}' is in use by another agenttrace run"
                    f"{f' (pid {holder})' if holder.isdigit() else ''}: its cgroup would be shared, "
                    f"and either run's end would kill the other's command; choose another name") from None
            if _same_file(self.path, fd):
                break
            os.close(fd)            # locked a file its last holder had just removed
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        sweep_stale(self.path.parent, keep=self.path)
        return self

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        try:
            self.path.parent.rmdir()    # the last run leaves no folder behind
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock_or_swept(fd: int, path: Path):
    """True: locked. False: another run holds it. None: the file was swept away meanwhile."""
    deadline = time.monotonic() + _SWEEP_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not _same_file(path, fd):
                return None
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def sweep_stale(root: Path = LOCK_ROOT, keep: Path | None = None, now: float | None = None) -> list[str]:
    """Remove lock files of runs that died without removing them; the names removed."""
    removed = []
    now = time.time() if now is None else now
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        path = root / name
        if not name.endswith(".lock") or path == keep:
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < STALE_AFTER_S:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue            # a live run holds it
            if _same_file(path, fd):
                try:
                    path.unlink()
                    removed.append(name)
                except OSError:
                    pass
        finally:
            os.close(fd)
    return removed
