"""Fork records stay in the kernel by default (docs/MIGRATION.md): real probes, real cgroups.

The creator chain lives in the kernel map proc_forks; exec records carry the creator, processes
that only forked are built from their entry when a record names them, exits of processes no
record named are counted, not sent. `--fork-records` (or a rule on kind `fork`) brings the old
records back."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import AGENTTRACE, AgentTree, Session, ListSink, need_bpf
from agenttrace.enrich.proctable import BOOT_ID

PY = sys.executable


@pytest.fixture(scope="module")
def shared():
    """One tracer (proc + net probes, no rules) for the in-process cases of this module."""
    need_bpf()
    from agenttrace.enrich.cgroups import cgroup2_mount
    from agenttrace.session.pipeline import Options, Tracer
    tree = AgentTree(cgroup2_mount())
    sink = ListSink()
    tracer = Tracer(Options(cgroups=[tree.root], features=("proc", "net")), [sink])
    try:
        tracer.start()
        yield tree, Session(tracer, sink)
    finally:
        tracer.stop()
        tree.cleanup()


def _started(sess):
    return [r for r in sess.records if r["kind"] == "lifecycle" and r["phase"] == "started"][0]


def test_exec_storm_has_exec_and_exit_but_no_fork_records(shared):
    tree, sess = shared
    a = tree.agent("storm")
    assert _started(sess)["fork_records"] is False
    r = tree.run(a, ["/bin/sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do /bin/true; done"])
    assert r.returncode == 0
    sh = sess.wait_for(lambda: sess.of("exec", proc__filename="/bin/sh", agent__id="storm"))[0]["proc"]
    trues = sess.wait_for(lambda: (lambda t: t if len(t) == 12 else None)(
        sess.of("exec", proc__filename="/bin/true", agent__id="storm")))
    pids = {t["proc"]["pid"] for t in trues}
    sess.wait_for(lambda: pids <= {e["proc"]["pid"] for e in sess.of("exit", agent__id="storm")})
    sess.settle()
    assert not sess.of("fork", agent__id="storm")
    for t in trues:
        p = t["proc"]
        assert p["ppid"] == sh["pid"] and p["creator"] == sh["pid"]
        # the creator from the kernel: the same chain and ids the fork records gave
        assert [x["pid"] for x in p["ancestry"][:2]] == [sh["pid"], os.getpid()]
        assert p["parent_exec_id"] == sh["exec_id"]
        assert p["exec_id"].startswith(f"{BOOT_ID}-{p['pid']}-")
    exits = {e["proc"]["pid"]: e for e in sess.of("exit", agent__id="storm")}
    assert all(exits[pid]["exit_code"] == 0 and exits[pid]["proc"]["exe"] == "/bin/true" for pid in pids)
    assert sh["pid"] in exits
    c = sess.tracer.counters()["processes"]
    assert c["fork_records"] is False and c["forks_quiet"] >= 12 and c["forks"] >= c["forks_quiet"]
    assert c["released"] >= 12 and c["evictions_possible"] is False


def test_shell_double_fork_keeps_the_true_creator(shared):
    tree, sess = shared
    a = tree.agent("dbl-sh")
    # `( cmd & )`: a subshell forks the background job and exits at once; the job is
    # reparented (to init or a subreaper) before or after its exec
    r = tree.run(a, ["/bin/sh", "-c", "(exec /bin/sleep 0.3 &) ; /bin/sleep 0.6"])
    assert r.returncode == 0
    sh = sess.wait_for(lambda: sess.of("exec", proc__filename="/bin/sh", agent__id="dbl-sh"))[0]["proc"]
    bg = sess.wait_for(lambda: [e for e in sess.of("exec", agent__id="dbl-sh")
                                if e["proc"]["args"] == ["/bin/sleep", "0.3"]])[0]["proc"]
    fg = sess.wait_for(lambda: [e for e in sess.of("exec", agent__id="dbl-sh")
                                if e["proc"]["args"] == ["/bin/sleep", "0.6"]])[0]["proc"]
    assert fg["ancestry"][0]["pid"] == sh["pid"]
    # the background job's creator is the subshell (a fork-only process), whose creator is sh
    sub = bg["ancestry"][0]
    assert sub["pid"] not in (sh["pid"], 1) and sub["exe"] == "/bin/sh"
    assert bg["ancestry"][1]["pid"] == sh["pid"] and bg["creator"] == sub["pid"]
    assert bg["parent_exec_id"] == sub["exec_id"]
    assert sub["exec_id"].startswith(f"{BOOT_ID}-{sub['pid']}-")
    assert not sess.of("fork", agent__id="dbl-sh")


def test_forked_worker_that_connects_is_reported_with_its_exit(shared):
    tree, sess = shared
    a = tree.agent("worker")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    code = textwrap.dedent(f"""
        import os, socket
        pid = os.fork()
        if pid == 0:
            s = socket.create_connection(("127.0.0.1", {port}))
            s.close()
            os._exit(3)
        idle = os.fork()
        if idle == 0:
            os._exit(0)            # forks and does nothing: no record of it at all
        os.waitpid(pid, 0)
        os.waitpid(idle, 0)
        print(pid, idle, flush=True)
    """)
    try:
        r = tree.run(a, [PY, "-c", code])
    finally:
        srv.close()
    child, idle = (int(x) for x in r.stdout.split())
    top = sess.wait_for(lambda: sess.of("exec", proc__filename=PY, agent__id="worker"))[0]["proc"]
    conn = sess.wait_for(lambda: sess.of("connect", proc__pid=child))[0]
    ex = sess.wait_for(lambda: sess.of("exit", proc__pid=child))[0]
    sess.wait_for(lambda: sess.of("exit", proc__pid=top["pid"]))
    sess.settle()
    p = conn["proc"]
    assert conn["net"]["dst"]["port"] == port
    # built from the kernel's entry as the fork record would have built it
    assert p["ppid"] == top["pid"] and p["parent_exec_id"] == top["exec_id"]
    assert p["ancestry"][0]["pid"] == top["pid"]
    assert p["exe"] == top["exe"] and p["args"] == top["args"]      # inherited until it execs
    born = int(p["exec_id"].rsplit("-", 1)[1])
    assert p["exec_id"] == f"{BOOT_ID}-{child}-{born}"
    assert int(top["exec_id"].rsplit("-", 1)[1]) < born      # forked after its parent's exec
    assert ex["exit_code"] == 3 and ex["proc"]["exec_id"] == p["exec_id"]
    # the idle child left no record, but the kernel counted its fork and its unsent exit
    assert not [r for r in sess.records if (r.get("proc") or {}).get("pid") == idle]
    kf = sess.tracer.kernel_forks.counts(os.stat(a).st_ino)
    assert kf["forks"] == kf["forks_quiet"] == 2 and kf["exits_quiet"] == 1


def _cli(tmp_path, name, *extra):
    out = tmp_path / f"{name}.jsonl"
    code = textwrap.dedent("""
        import os
        kids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            kids.append(pid)
        for k in kids:
            os.waitpid(k, 0)
        os.system("/bin/true")
        print(*kids, flush=True)
    """)
    r = subprocess.run([AGENTTRACE, "run", "--no-net", "--output", str(out), "--agent", name, *extra,
                        "--", PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    return [int(x) for x in r.stdout.split()], recs


def _summary(recs):
    return [r for r in recs if r["kind"] == "summary"][0]["summary"]


def test_cli_default_and_fork_records_flag(tmp_path):
    kids, off = _cli(tmp_path, "forks-off")
    kids_on, on = _cli(tmp_path, "forks-on", "--fork-records")
    started = lambda recs: [r for r in recs if r["kind"] == "lifecycle" and r["phase"] == "started"][0]  # noqa: E731
    assert started(off)["fork_records"] is False and started(on)["fork_records"] is True
    assert all(r["schema_version"] == "1.2" for r in off)
    assert not [r for r in off if r["kind"] == "fork"]
    # the old contract, restored: a fork record per new process, its exit after it
    forks = {r["proc"]["pid"]: r for r in on if r["kind"] == "fork"}
    assert set(kids_on) <= set(forks)
    top = [r for r in on if r["kind"] == "exec" and r["proc"]["filename"] == PY][0]["proc"]
    for k in kids_on:
        f = forks[k]["proc"]
        assert f["ppid"] == top["pid"] and f["parent_exec_id"] == top["exec_id"] and f["exe"] == PY
        assert [r for r in on if r["kind"] == "exit" and r["proc"]["pid"] == k]
    # exits of processes no record named stay in the kernel; the rest are all there
    off_exits = {r["proc"]["pid"] for r in off if r["kind"] == "exit"}
    assert not off_exits & set(kids)
    assert {r["proc"]["pid"] for r in off if r["kind"] == "exec"} <= off_exits
    # the summary's fork count is the same either way: 3 children, and what os.system forks
    s_off, s_on = _summary(off)["processes"], _summary(on)["processes"]
    assert s_off["forks"] == s_on["forks"] == len(forks) >= 4
    assert s_off["execs"] == s_on["execs"]


def test_rule_on_fork_turns_fork_records_on(tmp_path):
    rules = tmp_path / "fork-rule.yaml"
    rules.write_text(textwrap.dedent("""
        rules:
          - id: test-fork-seen
            description: a rule on forks needs fork records
            category: exec
            severity: info
            on: [fork]
            condition: 'proc.pid > 0'
            action: report
    """))
    kids, recs = _cli(tmp_path, "forks-rule", "--rules", str(rules))
    started = [r for r in recs if r["kind"] == "lifecycle" and r["phase"] == "started"][0]
    assert started["fork_records"] is True
    forks = {r["proc"]["pid"] for r in recs if r["kind"] == "fork"}
    assert set(kids) <= forks
    alerts = [r for r in recs if r["kind"] == "alert" and r["rule"]["id"] == "test-fork-seen"]
    assert alerts and alerts[0]["rule"]["outcome"] == "reported"      # repeats are de-duplicated
    assert _summary(recs)["processes"]["forks"] == len(forks)


EXEC_RULE = """
rules:
  - id: test-exec-only
    description: a rule on execs only
    category: exec
    severity: info
    on: [exec]
    match: {exe: {basenames: [no-such-tool-here]}}
    action: report
"""


def test_reload_with_a_fork_rule_turns_fork_records_on(agent_tree, make_session, tmp_path):
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import load_rules
    f1, f2 = tmp_path / "exec.yaml", tmp_path / "fork.yaml"
    f1.write_text(EXEC_RULE)
    f2.write_text(EXEC_RULE + textwrap.indent(textwrap.dedent("""
        - id: test-fork-rule
          description: every fork, so fork records are needed
          category: exec
          severity: info
          on: [fork]
          condition: 'proc.pid > 0'
          action: report
    """), "  "))
    sess = make_session([agent_tree.root], engine=Engine(load_rules([str(f1)])), features=("proc",))
    a = agent_tree.agent("reload")
    assert _started(sess)["fork_records"] is False
    code = "import os\npid = os.fork()\nif pid == 0: os._exit(0)\nos.waitpid(pid, 0)\nprint(pid, flush=True)"
    first = int(tree_run(agent_tree, a, code))
    sess.wait_for(lambda: sess.of("exit", agent__id="reload"))
    assert sess.tracer.reload_rules(load_rules([str(f2)]))
    reloaded = [r for r in sess.records if r["kind"] == "lifecycle" and r["phase"] == "reloaded"][0]
    assert reloaded["fork_records"] is True
    second = int(tree_run(agent_tree, a, code))
    forks = sess.wait_for(lambda: sess.of("fork", proc__pid=second))
    assert forks and forks[0]["proc"]["ppid"] != 0
    assert sess.wait_for(lambda: sess.of("exit", proc__pid=second))
    sess.settle()
    assert not sess.of("fork", proc__pid=first) and not sess.of("exit", proc__pid=first)


def tree_run(tree, agent, code):
    r = tree.run(agent, [PY, "-c", code])
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[0]


def test_daemon_reload_applies_fork_records_without_a_restart():
    from agenttrace.config import Config
    from agenttrace.ops.daemon import _restart_needed
    old = Config.model_validate({})
    new = Config.model_validate({"probes": {"fork_records": True}})
    assert _restart_needed(old, new) == []
    both = Config.model_validate({"probes": {"fork_records": True, "files": True}})
    assert _restart_needed(old, both) == ["probes"]


def test_fork_entries_build_what_fork_records_built_and_stay_bounded():
    """ProcTable alone: a process met without an exec, from its kernel entry, is the Proc its
    fork record made; an agent's chain of thousands of nested forks costs no recursion."""
    from agenttrace.enrich.proctable import ANCESTRY_DEPTH, ProcTable
    base, n = 10_000_000, 5000
    ents = {base + i: (base + i - 1 if i else 0, 100 + i, 0) for i in range(n)}
    by_records = ProcTable()
    by_records.on_exec(base - 1, 1, 0, "py", "/usr/bin/python3", ["python3"], 50)
    by_records.on_fork(base - 1, base, 100, 0, "py")
    by_entry = ProcTable()
    by_entry.on_exec(base - 1, 1, 0, "py", "/usr/bin/python3", ["python3"], 50)
    by_entry.fork_lookup = {base: (base - 1, 100, 0)}.get
    want, got = by_records.peek(base), by_entry.get(base)
    assert (got.exec_id, got.parent_exec_id, got.parent, got.exe, got.args) == \
        (want.exec_id, want.parent_exec_id, want.parent, want.exe, want.args)
    deep = ProcTable()
    deep.fork_lookup = ents.get
    leaf = deep.get(base + n - 1)
    assert leaf.exec_id.endswith(f"-{base + n - 1}-{100 + n - 1}")
    assert len(deep) == ANCESTRY_DEPTH + 1
    assert [a["pid"] for a in deep.ancestry(leaf.pid)] == [base + n - 2 - i for i in range(ANCESTRY_DEPTH)]
