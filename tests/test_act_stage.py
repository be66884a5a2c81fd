"""The act stage with real probes and real processes: kills run on their own worker so other
records never wait behind them, outcomes say what really happened (`exited` for a target that
was already gone), and a kill takes the target's whole tree, double-forked children included."""
import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

PY = sys.executable


def _engine(mode, text, tmp_path, actions=None):
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import load_rules
    f = tmp_path / "rules.yaml"
    f.write_text(textwrap.dedent(text))
    return Engine(load_rules([str(f)]), mode=mode, actions=actions)


KILL_MARKED = """
rules:
  - id: test-kill-marked
    description: test rule, kills (from userspace) any exec whose argv carries the marker
    category: exec
    severity: high
    on: [exec]
    match: {exe: {args_contain: ["{marker}"]}}
    action: kill
"""


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st[st.rfind(")") + 2] != "Z"


def test_kills_do_not_hold_back_other_records(agent_tree, make_session, tmp_path):
    """20 kill-triggering execs at once, with each verification slowed down, and an unrelated
    connect from another agent right after: the connect's record is written while most kill
    alerts are still being acted on (the old act-on-the-reader design wrote it after all 20)."""
    from agenttrace.act.actions import Actions

    class SlowActions(Actions):
        # the real Actions, each membership check made slow (as a loaded node or a process
        # slow to die makes verification): 20 kills take >= 2 s
        def _in_cgroup(self, pid, rel):
            time.sleep(0.1)
            return super()._in_cgroup(pid, rel)

    marker = "at-act-marker-" + os.urandom(3).hex()
    eng = _engine("enforce", KILL_MARKED.replace("{marker}", marker), tmp_path, actions=SlowActions())
    sess = make_session([agent_tree.root], engine=eng, mode="enforce")
    bad, good = agent_tree.agent("killer"), agent_tree.agent("bystander")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    # distinct argv each: identical alerts would be de-duplicated into one plus a summary
    procs = [agent_tree.spawn(bad, ["sh", "-c", "sleep 30; :", marker, str(i)]) for i in range(20)]
    try:
        conn = agent_tree.spawn(good, [PY, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port})).close()"])
        conn.wait(30)
        killed = sess.wait_for(lambda: len([a for a in sess.of("alert") if a["rule"]["id"] == "test-kill-marked"]) >= 20
                               and sess.of("alert"), timeout=60)
        assert killed
        recs = sess.records
        pos_conn = next(i for i, r in enumerate(recs) if r.get("kind") == "connect"
                        and r["net"]["dst"]["port"] == port and r["agent"]["id"] == "bystander")
        alert_pos = [i for i, r in enumerate(recs) if r.get("kind") == "alert" and r["rule"]["id"] == "test-kill-marked"]
        later = [i for i in alert_pos if i > pos_conn]
        assert len(later) >= 10, (pos_conn, alert_pos)
        outcomes = [recs[i]["rule"]["outcome"] for i in alert_pos]
        assert outcomes.count("killed") == 20, outcomes
        for p in procs:
            p.wait(10)
            assert p.returncode == -9
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        srv.close()


def test_target_already_gone_is_exited(agent_tree, make_session, tmp_path):
    marker = "at-exit-marker-" + os.urandom(3).hex()
    sess = make_session([agent_tree.root], engine=_engine("enforce", KILL_MARKED.replace("{marker}", marker), tmp_path),
                        mode="enforce")
    a = agent_tree.agent("quick")
    # `true` ignores its arguments and is gone before userspace reads its exec record
    r = agent_tree.run(a, ["true", marker])
    assert r.returncode == 0
    al = sess.wait_for(lambda: [x for x in sess.of("alert") if x["rule"]["id"] == "test-kill-marked"])
    assert al[0]["rule"]["outcome"] == "exited", al[0]["rule"]
    assert al[0]["rule"].get("exit_code") == 0
    assert "already exited" in al[0]["rule"]["message"]


KILL_ON_CONNECT = """
rules:
  - id: test-kill-on-connect
    description: test rule, kills (from userspace) a process that connects to one loopback port
    category: egress
    severity: high
    on: [connect]
    match: {dst: {cidrs: ["127.0.0.1/32"], ports: [{port}]}}
    action: kill
"""

TREE = """
import os, socket, subprocess, sys, time
child = subprocess.Popen(["sleep", "100"])
r, w = os.pipe()
if os.fork() == 0:                 # double fork: the grandchild is reparented away from us
    if os.fork() == 0:
        os.write(w, b"%d\\n" % os.getpid())      # its own pid: no guessing from /proc
        if sys.argv[2] == "exec":
            os.execvp("sleep", ["sleep", "200"])
        time.sleep(200)            # a fork-only orphan: no record names it (fork records off)
    os._exit(0)
gc = int(os.read(r, 32).split()[0])
time.sleep(0.2)                    # the intermediate is gone, the grandchild is sleep 200
print(child.pid, gc, flush=True)
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
time.sleep(30)
"""


@pytest.mark.parametrize("grandchild", ["exec", "fork-only"])
def test_kill_takes_the_whole_tree(agent_tree, make_session, tmp_path, grandchild):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    sess = make_session([agent_tree.root], engine=_engine("enforce", KILL_ON_CONNECT.replace("{port}", str(port)), tmp_path),
                        mode="enforce")
    a = agent_tree.agent("tree")
    import subprocess
    p = agent_tree.spawn(a, [PY, "-c", TREE, str(port), grandchild], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) >= 2, pids
        al = sess.wait_for(lambda: [x for x in sess.of("alert") if x["rule"]["id"] == "test-kill-on-connect"])
        assert al[0]["rule"]["outcome"] == "killed", al[0]["rule"]
        p.wait(10)
        assert p.returncode == -9
        deadline = time.monotonic() + 5
        while any(_alive(x) for x in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [x for x in pids if _alive(x)], "descendants survived the kill"
        assert set(pids) <= set(al[0]["rule"].get("killed_descendants", [])), al[0]["rule"]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        srv.close()
