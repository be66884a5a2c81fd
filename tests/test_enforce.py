"""Enforce mode with real probes: kernel blocks and kills, userspace kills, kill-agent,
and the scan window, each with the alert's outcome checked against what really happened."""
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from harness import block_port_rule

PY = sys.executable


def _engine(mode, rule_text=None, tmp_path=None, default=False):
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    paths = list(default_rule_paths()) if default else []
    if rule_text is not None:
        f = tmp_path / "rules.yaml"
        f.write_text(textwrap.dedent(rule_text))
        paths.append(str(f))
    return Engine(load_rules(paths), mode=mode)




def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    return srv, srv.getsockname()[1]


def _alerts(sess, rule_id):
    return [a for a in sess.of("alert") if a["rule"]["id"] == rule_id]


@pytest.mark.parametrize("mode", ["enforce", "monitor"])
def test_blocked_destination(mode, agent_tree, make_session, tmp_path):
    srv, port = _listener()
    try:
        a = agent_tree.agent("blocked")
        sess = make_session([agent_tree.root], engine=_engine(mode, block_port_rule(port, "test-block-port"), tmp_path),
                            mode=mode)
        r = agent_tree.run(a, [PY, "-c", f"import socket; print(socket.socket().connect_ex(('127.0.0.1', {port})))"])
        err = int(r.stdout)
        al = sess.wait_for(lambda: _alerts(sess, "test-block-port"))
        try:
            conn, _ = srv.accept()
            conn.close()
            accepted = True
        except BlockingIOError:
            accepted = False
    finally:
        srv.close()
    al = al[0]
    if mode == "enforce":
        assert err == errno.EPERM
        assert not accepted, "the peer saw a connection the kernel should have stopped"
        assert al["net"]["verdict"] == "blocked" and al["net"]["result"] == "blocked"
        assert al["rule"]["outcome"] == "blocked"
    else:
        assert err == 0 and accepted
        assert al["net"]["verdict"] == "allowed" and al["net"]["result"] == "established"
        assert al["rule"]["outcome"] == "reported"
        assert al["net"]["policy_id"] >= 1     # the kernel says which policy would have blocked it


def test_miner_binary_killed_in_kernel(agent_tree, make_session, tmp_path):
    miner = tmp_path / "xmrig"
    shutil.copy("/bin/echo", miner)
    a = agent_tree.agent("miner")
    sess = make_session([agent_tree.root], engine=_engine("enforce", default=True), mode="enforce")
    r = agent_tree.run(a, [str(miner), "first-line"])
    assert r.returncode == -signal.SIGKILL
    assert r.stdout == b"", "the killed exec must not print its first line"
    al = sess.wait_for(lambda: _alerts(sess, "mining-binary-exec"))[0]
    assert al["rule"]["outcome"] == "killed" and al["proc"]["killed_in_kernel"] is True
    assert al["rule"]["category"] == "mining" and al["agent"]["id"] == "miner"


def test_miner_binary_monitor_mode_runs(agent_tree, make_session, tmp_path):
    miner = tmp_path / "xmrig"
    shutil.copy("/bin/echo", miner)
    a = agent_tree.agent("miner-mon")
    sess = make_session([agent_tree.root], engine=_engine("monitor", default=True), mode="monitor")
    r = agent_tree.run(a, [str(miner), "first-line"])
    assert r.returncode == 0 and r.stdout == b"first-line\n"
    al = sess.wait_for(lambda: _alerts(sess, "mining-binary-exec"))[0]
    assert al["rule"]["outcome"] == "reported"


def test_stratum_args_killed_from_userspace(agent_tree, make_session):
    a = agent_tree.agent("stratum")
    sess = make_session([agent_tree.root], engine=_engine("enforce", default=True), mode="enforce")
    p = agent_tree.spawn(a, [PY, "-c", "import time; time.sleep(60)", "-o", "stratum+tcp://pool.example:3333"])
    try:
        al = sess.wait_for(lambda: _alerts(sess, "mining-stratum-args"))
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == -signal.SIGKILL
    assert al[0]["rule"]["outcome"] == "killed"


KILL_AGENT_RULE = """
rules:
  - id: test-kill-agent
    description: test rule, kills the whole agent on a forbidden tool
    category: exec
    severity: critical
    on: [exec]
    match:
      exe: {basenames: [forbidden-tool]}
    action: kill-agent
"""


def test_kill_agent_empties_cgroup(agent_tree, make_session, tmp_path):
    tool = tmp_path / "forbidden-tool"
    os.symlink("/bin/sleep", tool)
    a = agent_tree.agent("doomed")
    sess = make_session([agent_tree.root], engine=_engine("enforce", KILL_AGENT_RULE, tmp_path), mode="enforce")
    bystander = agent_tree.spawn(a, ["/bin/sleep", "60"])
    offender = agent_tree.spawn(a, [str(tool), "60"])
    try:
        al = sess.wait_for(lambda: _alerts(sess, "test-kill-agent"))
        bystander.wait(timeout=30)
        offender.wait(timeout=30)
    finally:
        for p in (bystander, offender):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert al[0]["rule"]["outcome"] == "killed"
    assert (a / "cgroup.procs").read_text().strip() == ""


def test_scan_of_40_internal_ports_fires_once(netlab, agent_tree, make_session):
    a = agent_tree.agent("scanner")
    sess = make_session([agent_tree.root], engine=_engine("monitor", default=True))
    code = textwrap.dedent(f"""
        import socket
        for port in range(20000, 20040):
            s = socket.socket(); s.settimeout(2)
            s.connect_ex(("{netlab.internal_host}", port)); s.close()
    """)
    r = netlab.check_in_agent([PY, "-c", code], cgroup=a, timeout=120)
    assert r.returncode == 0, r.stderr
    sess.wait_for(lambda: len([c for c in sess.of("connect") if c["net"]["dst"]["addr"] == netlab.internal_host]) >= 40)
    sess.settle()
    scans = _alerts(sess, "scan-internal-ports")
    # one alert when the threshold is crossed, and one episode total when the stream ends
    # (the tracer flushes the engine on drain): never one per port
    firing = [s for s in scans if "repeats" not in s["rule"]]
    totals = [s for s in scans if "repeats" in s["rule"]]
    assert len(firing) == 1 and firing[0]["window"]["count"] == firing[0]["window"]["threshold"]
    assert len(totals) == 1 and totals[0]["window"]["count"] == 40
    assert totals[0]["agent"]["id"] == "scanner"


def test_metadata_blocked_in_netns(netlab, agent_tree, make_session):
    """169.254.169.254 from an agent: EPERM in enforce mode (the netns has no route anyway)."""
    a = agent_tree.agent("meta")
    sess = make_session([agent_tree.root], engine=_engine("enforce", default=True), mode="enforce")
    r = netlab.python_in_agent("import socket; print(socket.socket().connect_ex(('169.254.169.254', 80)))", cgroup=a)
    assert int(r.stdout) == errno.EPERM
    al = sess.wait_for(lambda: _alerts(sess, "egress-metadata-address"))[0]
    assert al["rule"]["outcome"] == "blocked" and al["net"]["dst"]["scope"] == "metadata"
