"""Lock files of `agenttrace run`s killed with SIGKILL are swept by the next run: only files no
run holds and nobody wrote for STALE_AFTER_S; a held file and a just-made one stay."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from conftest import AGENTTRACE
from agenttrace.enrich.cgroups import cgroup2_mount, kill_and_remove
from agenttrace.session.runner import RUN_PARENT
from agenttrace.session.agentlock import LOCK_ROOT, STALE_AFTER_S, AgentLock, sweep_stale


def _old(path):
    t = time.time() - STALE_AFTER_S - 5
    os.utime(path, (t, t))


def test_sweep_removes_only_unheld_old_lock_files(tmp_path):
    stale, fresh, held = tmp_path / "stale.lock", tmp_path / "fresh.lock", tmp_path / "held.lock"
    other = tmp_path / "notes.txt"
    for p in (stale, fresh, held, other):
        p.write_text("123\n")
    _old(stale)
    _old(other)
    # a live holder in another process (flock is per open file, so it must be another open)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('ok', flush=True); sys.stdin.read()",
                               str(held)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"ok"
        _old(held)
        assert sweep_stale(tmp_path) == ["stale.lock"]
        assert not stale.exists() and fresh.exists() and held.exists() and other.exists()
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_acquire_sweeps_and_a_swept_name_can_be_taken(tmp_path):
    (tmp_path / "dead.lock").write_text("999999\n")
    _old(tmp_path / "dead.lock")
    lock = AgentLock("mine", root=tmp_path).acquire()
    try:
        assert not (tmp_path / "dead.lock").exists()
        assert (tmp_path / "mine.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    assert not tmp_path.exists(), "the last run leaves no folder behind"
    # taking a name whose stale file is there: the old file is reused (flock is free)
    tmp_path.mkdir()
    (tmp_path / "again.lock").write_text("999999\n")
    _old(tmp_path / "again.lock")
    AgentLock("again", root=tmp_path).acquire().release()
    assert not tmp_path.exists()


def test_a_lock_attempt_during_a_sweepers_hold_looks_again(tmp_path, monkeypatch):
    # The sweeper holds the file (locked) and removes it a moment later; the run that opened it
    # must not take the sweeper for an owner.
    path = tmp_path / "name.lock"
    path.write_text("1\n")
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    sweeper = subprocess.Popen([sys.executable, "-c",
                                "import os,sys,time; time.sleep(0.05); os.unlink(sys.argv[1])", str(path)])
    try:
        lock = AgentLock("name", root=tmp_path).acquire()
        assert lock.fd >= 0 and os.fstat(lock.fd).st_ino != os.fstat(fd).st_ino
        lock.release()
    finally:
        os.close(fd)
        sweeper.wait(10)


def test_a_run_sweeps_what_a_killed_run_left(require_bpf):
    # the way it happens: a run killed with -9 leaves its file; the next run (any name) removes it
    name = f"sweep-victim-{os.getpid()}"
    victim = subprocess.Popen([AGENTTRACE, "run", "--no-net", "--no-rules", "--output", os.devnull,
                               "--agent", name, "--", "sleep", "60"], stderr=subprocess.PIPE)
    path = LOCK_ROOT / f"{name}.lock"
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.exists(), "the run never took its lock"
    finally:
        victim.kill()
        victim.wait(30)
    assert path.exists(), "SIGKILL cannot remove the file: nothing to sweep"
    _old(path)
    r = subprocess.run([AGENTTRACE, "run", "--no-net", "--no-rules", "--output", os.devnull,
                        "--agent", f"sweeper-{os.getpid()}", "--", "true"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    assert not path.exists()
    # the killed run's `sleep` (still in its agent cgroup) and the cgroup: what this test made
    kill_and_remove(cgroup2_mount() / RUN_PARENT / name)
