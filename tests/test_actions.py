"""The act stage against real processes in a real temporary cgroup: every outcome verified."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from agenttrace.act.actions import Actions, cgroup_events, find_cgroup2_mount
from agenttrace.clock import FakeClock
from agenttrace.match.engine import Engine
from agenttrace.session.event import Event
from agenttrace.match.rules import load_rules

REQUIRE = os.environ.get("AGENTTRACE_REQUIRE_BPF") == "1"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    m = find_cgroup2_mount()
    if not m:
        return "no cgroup2 mount in /proc/self/mountinfo"
    if not Path(m, "cgroup.procs").exists():
        return f"{m} is not a cgroup2 hierarchy"
    return None


@pytest.fixture
def cg():
    why = _why_not()
    if why:
        if REQUIRE:
            pytest.fail(why)
        pytest.skip(why)
    root = Path(find_cgroup2_mount())
    path = root / f"agenttrace-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    procs: list[subprocess.Popen] = []

    def spawn(argv=("sleep", "60")):
        def enter():
            with open(path / "cgroup.procs", "w") as f:
                f.write("0")
        p = subprocess.Popen(list(argv), preexec_fn=enter)
        procs.append(p)
        return p

    try:
        yield path, "/" + str(path.relative_to(root)), spawn
    finally:
        try:
            (path / "cgroup.freeze").write_text("0")
        except OSError:
            pass
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        for _ in range(200):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


def test_cgroup2_mount_parsed_from_mountinfo():
    from agenttrace.enrich.cgroups import parse_cgroup2_mount
    assert parse_cgroup2_mount("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n"
                               "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n") == "/sys/fs/cgroup/unified"
    assert parse_cgroup2_mount("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n") is None


def test_kill_pid_verifies_exit(cg):
    path, rel, spawn = cg
    p = spawn()
    res = Actions().kill_pid(p.pid, rel)
    assert res.outcome == "killed", res.detail
    assert p.wait(timeout=5) == -signal.SIGKILL


def test_kill_pid_refuses_a_pid_outside_the_agent_cgroup(cg):
    path, rel, spawn = cg
    outsider = subprocess.Popen(["sleep", "60"])
    try:
        res = Actions().kill_pid(outsider.pid, rel)
        assert res.outcome == "reported" and "not in agent cgroup" in res.detail
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


def test_kill_pid_already_gone(cg):
    path, rel, spawn = cg
    p = spawn(("true",))
    p.wait(timeout=10)
    res = Actions().kill_pid(p.pid, rel)
    assert res.outcome == "reported" and "exited" in res.detail


def test_kill_agent_empties_the_cgroup(cg):
    path, rel, spawn = cg
    ps = [spawn() for _ in range(3)]
    sub = path / "child"
    sub.mkdir()
    try:
        q = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: (sub / "cgroup.procs").write_text("0"))
        res = Actions().kill_cgroup(rel)
        assert res.outcome == "killed", res.detail
        assert (path / "cgroup.procs").read_text() == "" and cgroup_events(path)["populated"] == 0
        for p in ps + [q]:
            assert p.wait(timeout=5) == -signal.SIGKILL
    finally:
        for _ in range(200):
            try:
                sub.rmdir()
                break
            except OSError:
                time.sleep(0.01)


def test_freeze_agent_reports_frozen_and_thaws(cg):
    path, rel, spawn = cg
    p = spawn()
    a = Actions()
    res = a.freeze_cgroup(rel)
    assert res.outcome == "frozen", res.detail
    assert cgroup_events(path)["frozen"] == 1
    state = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state in ("S", "D", "t", "T")     # frozen tasks sleep in the freezer
    assert a.freeze_cgroup(rel, freeze=False).detail.endswith("thawed")
    assert cgroup_events(path)["frozen"] == 0


def test_refuses_the_cgroup_root_and_escapes(cg):
    a = Actions()
    for bad in ("/", "", "/../..", "/../../etc"):
        assert a.kill_cgroup(bad).outcome == "reported"
    assert a.freeze_cgroup("/").outcome == "reported"


RULES = """\
rules:
  - id: kill-it
    description: kill the process that ran the test binary
    category: exec
    severity: high
    on: [exec]
    match: {exe: {basenames: [sleep], args_contain: ["60"]}}
    action: kill
  - id: kill-agent
    description: kill the whole agent when it touches the bad port
    category: egress
    severity: critical
    on: [connect]
    match: {dst: {ports: [4444]}}
    condition: 'net.result != "blocked"'
    action: kill-agent
  - id: freeze-agent
    description: freeze the agent for a human on a scanner exec
    category: scan
    severity: high
    on: [exec]
    match: {exe: {basenames: [nmap]}}
    action: freeze-agent
"""


def _rec(kind, rel, pid, **body):
    return {"ts": "2025-11-27T08:00:00Z", "kind": kind, "node": "n",
            "agent": {"id": "t", "cgroup": rel, "cgroup_id": 1}, **body}


def test_engine_enforce_outcomes_are_verified(cg, tmp_path):
    path, rel, spawn = cg
    f = tmp_path / "r.yaml"
    f.write_text(RULES)
    eng = Engine(load_rules([f]), mode="enforce", clock=FakeClock())

    p = spawn()
    rec = _rec("exec", rel, p.pid, proc={"pid": p.pid, "comm": "sleep", "exe": "/usr/bin/sleep", "args": ["sleep", "60"]})
    (a,) = eng.process(Event.from_record(rec))
    assert a.record["rule"]["outcome"] == "killed"
    assert p.wait(timeout=5) == -signal.SIGKILL

    p2 = spawn()
    rec = _rec("exec", rel, p2.pid, proc={"pid": p2.pid, "comm": "nmap", "exe": "/usr/bin/nmap", "args": ["nmap"]})
    (a,) = eng.process(Event.from_record(rec))
    assert a.record["rule"]["outcome"] == "frozen" and cgroup_events(path)["frozen"] == 1
    (path / "cgroup.freeze").write_text("0")

    ps = [spawn() for _ in range(2)]
    rec = _rec("connect", rel, ps[0].pid, proc={"pid": ps[0].pid, "comm": "sleep", "exe": "/usr/bin/sleep", "args": []},
               net={"proto": "tcp", "dst": {"addr": "198.51.100.1", "port": 4444, "scope": "external"},
                    "verdict": "allowed", "result": "established"})
    (a,) = eng.process(Event.from_record(rec))
    assert a.record["rule"]["outcome"] == "killed"
    assert cgroup_events(path)["populated"] == 0
    for q in ps + [p2]:
        assert q.wait(timeout=5) == -signal.SIGKILL

    # the same exec rule on a pid that is not in the agent's cgroup: nothing is killed
    outsider = subprocess.Popen(["sleep", "60"])
    try:
        rec = _rec("exec", rel, outsider.pid, proc={"pid": outsider.pid, "comm": "sleep", "exe": "/usr/bin/sleep",
                                                     "args": ["sleep", "60", "x"]})
        (a,) = eng.process(Event.from_record(rec))
        assert a.record["rule"]["outcome"] == "reported" and "not in agent cgroup" in a.record["rule"]["message"]
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()
