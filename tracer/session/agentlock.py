"""One `agenttrace run -- CMD` per agent name at a time.

A run's agent is the cgroup <cgroup2>/agenttrace/<name>, and its end kills whatever is left in
that cgroup (runner.run_command). Two runs given the same `--agent` used to share the cgroup,
and the first to end killed the other's command (exit 137: two test suites on one machine,
each running the same `--agent sneaky-enforce` test). A run now holds its name with a lock
for its whole life; a second run of that name is refused before anything starts.

flock, not a pid written in a file: the kernel drops the lock when its holder dies, however it
dies, and a pid left behind by a dead run could name a live process once pids wrap. The file
is removed at the end, under the lock; whoever locked a file that was removed meanwhile (it
opened the old one) sees the path no longer names it and tries again."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_ROOT = Path("/run/agenttrace-run")


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
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise AgentInUse(
                    f"--agent: agent '{self.name}' is in use by another agenttrace run"
                    f"{f' (pid {holder})' if holder.isdigit() else ''}: its cgroup would be shared, "
                    f"and either run's end would kill the other's command; choose another name") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)            # locked a file its last holder had just removed
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
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
