"""Pure units: timestamps, scope, process table bounds, wait status."""
import os

import pytest

from agenttrace.enrich.enricher import wait_status
from agenttrace.enrich.scope import Scoper, parse_cidr
from agenttrace.enrich.proctable import ProcTable
from agenttrace.timefmt import format_ns, parse_ns


def test_timestamps_round_trip():
    t = 1_764_225_600_123_456_789
    s = format_ns(t)
    assert s == "2025-11-27T06:40:00.123456789Z"
    assert parse_ns(s) == t
    assert parse_ns("2025-11-27T07:40:00.5+01:00") == 1_764_225_600_500_000_000
    with pytest.raises(ValueError):
        parse_ns("2025-11-27T06:40:00")


@pytest.mark.parametrize("addr,scope", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "internal"),
    ("192.168.1.1", "internal"), ("100.64.0.1", "internal"), ("fd12::1", "internal"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"), ("100.100.100.200", "metadata"),
    ("203.0.113.10", "external"), ("8.8.8.8", "external"), ("::ffff:10.0.0.1", "internal"),
])
def test_scope(addr, scope):
    assert Scoper().scope(addr) == scope


def test_extra_internal_cidr():
    s = Scoper(internal=["203.0.113.0/24"])
    assert s.scope("203.0.113.7") == "internal"
    with pytest.raises(ValueError, match="not a CIDR"):
        parse_cidr("300.1.1.1/8")


def test_proc_table_is_bounded_and_keeps_creator_chain():
    t = ProcTable(max_entries=100)
    t.on_exec(10_000_001, 1, 0, "top", "/bin/top", ["top"], 1)
    t.on_fork(10_000_001, 10_000_002, 2, 0, "mid")
    t.on_fork(10_000_002, 10_000_003, 3, 0, "leaf")
    t.on_exit(10_000_002)
    t.on_exec(10_000_003, 1, 0, "echo", "/bin/echo", ["echo"], 4)   # reparented to 1
    anc = t.ancestry(10_000_003)
    assert [a["pid"] for a in anc[:2]] == [10_000_002, 10_000_001]
    for i in range(500):
        t.on_fork(10_000_001, 20_000_000 + i, 5, 0, "x")
    assert len(t) <= 100 and t.evictions >= 400


def test_cached_ancestry_follows_exec_fork_and_pid_reuse():
    t = ProcTable()
    t.on_exec(10_000_001, 1, 0, "sh", "/bin/sh", ["sh"], 1)
    t.on_fork(10_000_001, 10_000_002, 2, 0, "sh")
    first = t.ancestry(10_000_002)
    assert [(a["pid"], a["exe"]) for a in first][:1] == [(10_000_001, "/bin/sh")]
    # one list for every record of the process while its chain holds (the sink renders it
    # once); a change makes a new list and leaves the handed-out one as it was
    assert t.ancestry(10_000_002) is first
    before = [dict(a) for a in first]
    t.on_exec(10_000_001, 1, 0, "python3", "/usr/bin/python3", ["python3"], 3)   # the parent execs
    assert t.ancestry(10_000_002)[0]["exe"] == "/usr/bin/python3"
    assert t.ancestry(10_000_002) is not first and first == before
    t.forget(10_000_001)
    t.on_exec(10_000_001, 1, 0, "other", "/bin/other", ["other"], 4)   # pid reused
    assert t.ancestry(10_000_002)[0]["comm"] == "other"


def test_proc_table_reads_proc_for_unknown():
    t = ProcTable()
    me = t.get(os.getpid())
    assert me is not None and me.pid == os.getpid() and me.args


def test_proc_table_answers_for_a_gone_process_from_its_failed_look_up():
    """A pid found nowhere (no table entry, no kernel fork entry, no /proc) is not looked up
    again for a record from before that look-up, and is for a later record (the pid may be a
    new process's by then) and for a question without a record's time."""
    import subprocess
    import time
    child = subprocess.Popen(["true"])
    child.wait()        # reaped: its pid is in no /proc
    pid = child.pid
    asked = []
    t = ProcTable()
    t.fork_lookup = lambda p: asked.append(p)    # the kernel's map: nothing for it
    before = time.monotonic_ns()
    assert t.get(pid, before) is None and asked == [pid]
    assert t.get(pid, before + 1) is None and asked == [pid] and t.gone_hits == 1
    assert t.get(pid) is None and asked == [pid, pid]      # no record time: asked again
    assert t.get(pid, time.monotonic_ns()) is None and asked == [pid, pid, pid]   # newer record
    # a live process found later on the pid (here: ours) is never hidden by the old answer
    t._gone[os.getpid()] = time.monotonic_ns() + 10**12
    assert t.get(os.getpid()) is not None
    assert t.get(os.getpid(), 1) is not None        # now in the table: the table answers first


def test_wait_status():
    assert wait_status(3 << 8) == (3, None)
    assert wait_status(9) == (137, 9)
    assert wait_status(0) == (0, None)


def test_proc_table_forgets_exited_leaves_but_keeps_named_creators():
    import agenttrace.enrich.proctable as PT
    t = ProcTable()
    t.on_exec(10_000_001, 1, 0, "storm", "/bin/storm", ["storm"], 1)
    t.on_fork(10_000_001, 10_000_002, 2, 0, "mid")      # forks, exits before its child execs
    t.on_fork(10_000_002, 10_000_003, 3, 0, "late")
    t.on_exit(10_000_002)
    t.on_fork(10_000_001, 10_000_004, 4, 0, "named")    # a chain names it before it exits
    t.on_fork(10_000_004, 10_000_005, 5, 0, "kid")
    assert t.ancestry(10_000_005)[0]["pid"] == 10_000_004
    t.on_exit(10_000_004)
    t.on_exec(10_000_003, 1, 0, "echo", "/bin/echo", ["echo"], 6)   # within the window
    assert [a["pid"] for a in t.ancestry(10_000_003)][:2] == [10_000_002, 10_000_001]
    t.on_exec(10_000_006, 10_000_001, 0, "reused", "/bin/true", ["true"], 7)
    t.on_exit(10_000_006)
    t.on_exec(10_000_006, 10_000_001, 0, "true", "/bin/true", ["true"], 8)    # pid reused in place
    for i in range(PT.EXITED_KEEP + 10):     # a storm of leaves: each exits, none is named
        pid = 20_000_000 + i
        t.on_exec(pid, 10_000_001, 0, "true", "/bin/true", ["true"], 10 + i, creator=10_000_001)
        t.ancestry(pid)
        t.on_exit(pid)
    assert t.peek(20_000_000) is None and t.peek(20_000_000 + PT.EXITED_KEEP + 9) is not None
    assert t.forgotten >= 10 and len(t) < PT.EXITED_KEEP + 20
    assert t.peek(10_000_002) is not None and t.peek(10_000_004) is not None   # named: kept
    # the reused pid's new image is not forgotten with the old one's exit
    assert t.peek(10_000_006) is not None and t.peek(10_000_006).exec_id.endswith("-8")
