"""Forcing the kernel to hand out a chosen pid next, for the tests that play pid reuse.

As root, writing N-1 to /proc/sys/kernel/ns_last_pid (init pid namespace) makes N the next pid
a fork gets, machine-wide. Every test that does it holds LOCK (flock) from the write until its
fork has its pid, so two such tests never steer each other's forks; the window is a few
syscalls long, and a fork of anyone else that lands in it takes the pid instead (the caller sees
a different pid and tries again)."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
LOCK = "/run/agenttrace-tests-ns_last_pid.lock"


@contextmanager
def pid_lock():
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def next_pid_is(pid: int) -> None:
    """The next fork (of anyone) gets `pid`, if that pid is free. Hold pid_lock() around it."""
    fd = os.open(NS_LAST_PID, os.O_WRONLY)
    try:
        os.write(fd, str(pid - 1).encode())
    finally:
        os.close(fd)
