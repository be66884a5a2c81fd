"""The sched_process_exit hook is one raw tracepoint program for proc's exit records and escape's
membership (probes/proc.c, probes/escape.c): real probes, real threads, real cgroups.

A thread leaving is not a process exit; a process whose threads (or whose leader) left is still
an agent's process, so leaving the subtree afterwards is still caught and, in enforce mode,
killed in the kernel."""
import signal
import sys
import uuid

import pytest

from conftest import AgentTree, Session, ListSink, need_bpf, _kill_and_rmdir

PY = sys.executable

THREADS_THEN_EXIT = """
import sys, threading
ts = [threading.Thread(target=lambda: None) for _ in range(3)]
for t in ts: t.start()
for t in ts: t.join()
sys.exit(3)
"""

# the threads leave first, then the process moves itself out of the watched subtree
THREADS_THEN_ESCAPE = """
import os, sys, threading
t = threading.Thread(target=lambda: None); t.start(); t.join()
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
print("outside")
"""

# the leader thread ends first (pthread_exit: the process lives on in its other thread), and
# that thread moves the process out
LEADER_GONE_THEN_ESCAPE = """
import ctypes, os, sys, threading, time
def mover():
    time.sleep(0.3)
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
    os.write(1, b"outside\\n")
    os._exit(0)
threading.Thread(target=mover).start()
ctypes.CDLL(None).pthread_exit(None)
"""


@pytest.fixture(scope="module")
def shared():
    """One enforce-mode tracer (proc + escape probes, the default rules) for this module."""
    need_bpf()
    from agenttrace.enrich.cgroups import cgroup2_mount
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    from agenttrace.session.pipeline import Options, Tracer
    tree = AgentTree(cgroup2_mount())
    outside = cgroup2_mount() / f"agenttrace-outside-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    sink = ListSink()
    tracer = Tracer(Options(cgroups=[tree.root], features=("proc", "escape"), mode="enforce"), [sink],
                    engine=Engine(load_rules(default_rule_paths()), mode="enforce"))
    try:
        tracer.start()
        yield tree, Session(tracer, sink), outside
    finally:
        tracer.stop()
        _kill_and_rmdir(outside)
        tree.cleanup()


def _escape_alerts(sess, pid):
    return [a for a in sess.of("alert") if a["rule"]["id"] == "escape-cgroup-move"
            and a["escape"]["pid"] == pid and a["rule"]["outcome"] != "pending"]


def test_thread_exits_are_not_process_exits(shared):
    tree, sess, _ = shared
    a = tree.agent("threads")
    r = tree.run(a, [PY, "-c", THREADS_THEN_EXIT])
    assert r.returncode == 3
    pid = sess.wait_for(lambda: sess.of("exec", agent__id="threads"))[0]["proc"]["pid"]
    sess.wait_for(lambda: sess.of("exit", agent__id="threads", proc__pid=pid))
    sess.settle()
    exits = sess.of("exit", agent__id="threads")
    assert [e["proc"]["pid"] for e in exits] == [pid], exits
    assert exits[0]["exit_code"] == 3


def test_a_process_whose_threads_exited_is_still_caught_leaving(shared):
    tree, sess, outside = shared
    a = tree.agent("thr-esc")
    r = tree.run(a, [PY, "-c", THREADS_THEN_ESCAPE, str(outside)])
    assert r.returncode == -signal.SIGKILL and b"outside" not in r.stdout
    pid = sess.wait_for(lambda: sess.of("exec", agent__id="thr-esc"))[0]["proc"]["pid"]
    al = sess.wait_for(lambda: _escape_alerts(sess, pid))[0]
    assert al["escape"]["self"] is True and al["escape"]["verdict"] == "killed"


def test_a_process_whose_leader_thread_ended_is_still_caught_leaving(shared):
    """Before the hooks were one program, membership ended when the leader thread did: the
    process lived on in another thread and could leave unseen."""
    tree, sess, outside = shared
    a = tree.agent("ldr-esc")
    r = tree.run(a, [PY, "-c", LEADER_GONE_THEN_ESCAPE, str(outside)])
    assert r.returncode == -signal.SIGKILL and b"outside" not in r.stdout
    pid = sess.wait_for(lambda: sess.of("exec", agent__id="ldr-esc"))[0]["proc"]["pid"]
    al = sess.wait_for(lambda: _escape_alerts(sess, pid))[0]
    assert al["escape"]["self"] is True and al["escape"]["verdict"] == "killed"
