"""exeid's re-use of a recent stat for a gone process's exec path (issue 15): an exec that
happened before the path's last stat gets that answer; one after it sees a replaced file."""
from __future__ import annotations

import hashlib
import os
import subprocess
import time

from agenttrace.enrich.exeid import ExeIdentifier


def _gone_pid() -> int:
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    return p.pid


def test_exec_before_the_last_stat_reuses_it_and_one_after_sees_the_new_file(tmp_path):
    path = tmp_path / "prog"
    path.write_bytes(b"\x7fELF first image")
    ids = ExeIdentifier(signatures=[])
    pid = _gone_pid()
    before = time.monotonic_ns()
    ids.exec_ktime = before
    first = ids.identify(pid, str(path), str(path), ["prog"])
    assert first["sha256"] == hashlib.sha256(b"\x7fELF first image").hexdigest()
    stats = dict(ids.stats)
    new = tmp_path / "prog.new"
    new.write_bytes(b"\x7fELF second image")
    os.replace(new, path)
    # an exec of the same batch, older than the stat: the stat's answer, no new stat
    ids.exec_ktime = before + 1
    assert ids.identify(pid, str(path), str(path), ["prog"]) is first
    assert ids.stats["scanned"] == stats["scanned"]
    # an exec after the stat (after the replacement): stat'ed and scanned afresh
    ids.exec_ktime = time.monotonic_ns()
    second = ids.identify(pid, str(path), str(path), ["prog"])
    assert second["sha256"] == hashlib.sha256(b"\x7fELF second image").hexdigest()
    # unknown exec time (0): always a fresh stat
    ids.exec_ktime = 0
    assert ids.identify(pid, str(path), str(path), ["prog"])["sha256"] == second["sha256"]
