"""The doorbell for records userspace may act on (probes/common.h at_doorbell).

While records keep coming the reader sleeps between reads up to --batch-wait-ms; an exec whose
name a rule names (`exec_watch`: the pack's userspace kill rules are gated by those names) rings
a one-record ring the reader waits on through the gap, so its record does not wait out the gap;
an exec from outside the system directories rings the late bell, which ends the gap at
ringbuf.LATE_BELL_MS.
No time is asserted: the ring is seen in the doorbell's producer position (`bells`) and in a
poll that comes back from a 10-minute gap; the rate bound in the count of rings per read.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import AGENTTRACE
from harness import wait_until


@pytest.fixture
def bell_session(agent_tree, make_session):
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    sess = make_session([agent_tree.root], engine=Engine(load_rules(default_rule_paths()), mode="monitor"),
                        mode="monitor", features=("proc",))
    sess.settle()
    assert sess.tracer._reader is not None and sess.tracer._reader._bell is not None
    return sess


def _execs(sess, exe):
    return [e for e in sess.of("exec") if e["proc"]["exe"] == exe]


def test_named_exec_rings_and_an_unnamed_one_does_not(agent_tree, bell_session):
    sess = bell_session
    r = sess.tracer._reader
    a = agent_tree.agent("bell")
    before, late = r.bells, r.late_bells
    assert agent_tree.run(a, ["/bin/true"]).returncode == 0
    assert sess.wait_for(lambda: _execs(sess, "/bin/true"))
    sess.settle()
    # `true`: no rule names it, and it is in a system directory
    assert (r.bells, r.late_bells) == (before, late)
    # `sh` is a name the reverse-shell rule (killed from userspace) is gated on
    assert agent_tree.run(a, ["/bin/sh", "-c", "exit 0"]).returncode == 0
    assert sess.wait_for(lambda: _execs(sess, "/bin/sh"))
    assert (r.bells, r.late_bells) == (before + 1, late)


def test_exec_from_outside_the_system_directories_rings_the_late_bell(agent_tree, bell_session, tmp_path):
    """A copy of a program in a folder the agent can write (how a renamed tool arrives, which
    userspace knows by its content) rings the late bell, and cuts a long gap there."""
    import shutil
    sess = bell_session
    r = sess.tracer._reader
    a = agent_tree.agent("late")
    copy = tmp_path / "upd"
    shutil.copy("/bin/true", copy)
    before, late, cut = r.bells, r.late_bells, r.late_rings
    r.min_gap_ns, r.max_gap_ns, r.gap_ns = 1_000_000, 600 * 10**9, 600 * 10**9
    r._last_n, r._last_read_ns = 1, time.monotonic_ns()
    sess.tracer._quiet = False
    try:
        assert agent_tree.run(a, [str(copy)]).returncode == 0
        sess.tracer.poll(60_000)      # without the bell: its whole 60 s
        assert r.late_rings == cut + 1
        assert _execs(sess, str(copy))
    finally:
        r.min_gap_ns, r.max_gap_ns, r.gap_ns = 5_000_000, 15_000_000, 5_000_000
    assert (r.bells, r.late_bells) == (before, late + 1)


def test_named_exec_cuts_the_readers_gap(agent_tree, bell_session):
    """The reader is put in a 10-minute gap (floor left short): the poll comes back because the
    bell rang, with the named exec read."""
    sess = bell_session
    r = sess.tracer._reader
    a = agent_tree.agent("gap")
    rings = r.bell_rings
    r.min_gap_ns, r.max_gap_ns, r.gap_ns = 1_000_000, 600 * 10**9, 600 * 10**9
    r.late_gap_ns = 600 * 10**9
    r._last_n, r._last_read_ns = 1, time.monotonic_ns()
    sess.tracer._quiet = False
    try:
        assert agent_tree.run(a, ["/bin/sh", "-c", "exit 0"]).returncode == 0
        # without the bell this poll sleeps out its whole 60 s timeout
        sess.tracer.poll(60_000)
        assert r.bell_rings == rings + 1
        assert _execs(sess, "/bin/sh")
    finally:
        r.min_gap_ns, r.max_gap_ns, r.gap_ns = 5_000_000, 15_000_000, 5_000_000


def test_a_storm_of_named_execs_rings_at_most_once_per_read(agent_tree, bell_session):
    """Every exec of the storm is named (`sh`), yet a ring holds one record until the reader
    empties it: the rings are bounded by the reads, not by the records."""
    sess = bell_session
    r = sess.tracer._reader
    a = agent_tree.agent("storm")
    n = 300
    bells, reads = r.bells, r.batches
    p = agent_tree.spawn(a, ["/bin/sh", "-c", f"for i in $(seq {n}); do /bin/sh -c :; done"])
    try:
        while p.poll() is None:     # read while it runs: reads and rings interleave
            sess.tracer.poll(50)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert p.returncode == 0
    assert sess.wait_for(lambda: len(_execs(sess, "/bin/sh")) >= n + 1)
    sess.settle()
    rang, read = r.bells - bells, r.batches - reads
    # a ring waits for the next read to empty it; one more may come between that emptying and
    # the read's end (its record is read there, the ring by the poll after): at most two a read
    assert 1 <= rang <= 2 * read + 1, (rang, read)


def test_userspace_kill_through_run_with_a_long_batch_wait(agent_tree, tmp_path):
    """`agenttrace run --mode enforce` as the README shows, with a batch wait of a second and
    an exec loop keeping the reader in its gap: the reverse-shell line (killed from userspace)
    is still killed, and the stopped record counts the doorbell."""
    a = agent_tree.agent("kill")
    out = tmp_path / "out.jsonl"
    rel = "/" + os.path.relpath(agent_tree.root, "/sys/fs/cgroup/unified")
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", rel, "--mode", "enforce", "--no-net",
                               "--batch-wait-ms", "1000", "--output", str(out)], stderr=subprocess.PIPE)
    bg = None
    try:
        assert wait_until(lambda: out.exists() and '"phase":"started"' in out.read_text(), 60), tracer.stderr
        bg = agent_tree.spawn(a, ["/bin/sh", "-c", "while :; do /bin/true; done"])
        victim = agent_tree.spawn(a, ["/bin/bash", "-c", "sleep 30 # >/dev/tcp/192.0.2.1/9"])
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if bg is not None:
            bg.kill()
            bg.wait()
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err.decode(errors="replace")[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    al = [x for x in recs if x.get("kind") == "alert" and x["rule"]["id"] == "exec-reverse-shell"]
    assert al and al[0]["rule"]["outcome"] == "killed"
    stopped = next(x for x in recs if x.get("phase") == "stopped")
    assert stopped["stages"]["doorbell_rung"] >= 1


class _Ready:
    """An epoll stand-in: ready or not (the floor rule needs no ring)."""

    def __init__(self, ready):
        self.ready = ready

    def poll(self, t, n):
        return [(0, 1)] if self.ready else []


def test_rings_in_a_row_raise_the_floor_to_the_late_gap():
    """A lone ring is read within the wakeup interval; rings read after rings wait longer, up
    to the late gap, so a storm of named execs is read as often as the old batch wait."""
    from agenttrace.kernel.ringbuf import RingReader
    ms = 1_000_000
    r = RingReader.__new__(RingReader)
    r.min_gap_ns, r.late_gap_ns, r._bell_floor_ns, r.bell_rings = 5 * ms, 15 * ms, 5 * ms, 0
    r._late, r._last_read_ns = None, time.monotonic_ns() - 10**12   # floors already past: no sleep
    r._bell = (_Ready(True), None, None)
    floors = []
    for _ in range(4):
        assert r._wait_gap(1.0)
        floors.append(r._bell_floor_ns // ms)
    assert floors == [10, 15, 15, 15] and r.bell_rings == 4
    r._bell = (_Ready(False), None, None)
    assert not r._wait_gap(0.0)     # a gap with no ring: poll() puts the floor back


@pytest.mark.parametrize("how", ["dotdot", "dot", "slashes", "plain"])
def test_exec_path_through_dot_components_rings_the_late_bell(agent_tree, tmp_path, how):
    """The exec path the kernel holds is the one the exec named, not resolved: `/usr/../tmp/x`
    starts with /usr/ but is not there. `agenttrace run` as the README shows; the stopped record's
    stages.doorbell_late counts the rings. A path with a `..`, `.` or empty component rings the
    late bell; the same program named plainly in /usr does not."""
    import shutil
    copy = tmp_path / "upd"
    shutil.copy("/bin/true", copy)
    exe = {"dotdot": "/usr/.." + str(copy), "dot": "/usr/./bin/true", "slashes": "/usr//bin/true",
           "plain": "/usr/bin/true"}[how]
    a = agent_tree.agent("dots")
    out = tmp_path / "out.jsonl"
    rel = "/" + os.path.relpath(agent_tree.root, "/sys/fs/cgroup/unified")
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", rel, "--mode", "monitor", "--no-net",
                               "--output", str(out)], stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and '"phase":"started"' in out.read_text(), 60), tracer.stderr
        assert agent_tree.run(a, [exe]).returncode == 0
        assert wait_until(lambda: any('"kind":"exec"' in line and json.loads(line)["proc"]["exe"] == exe
                                      for line in out.read_text().splitlines()), 30)
    finally:
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err.decode(errors="replace")[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    stopped = next(x for x in recs if x.get("phase") == "stopped")
    assert stopped["stages"]["doorbell_late"]["rung"] == (0 if how == "plain" else 1)
