"""net.c's policy_free skip: a destination whose scope no policy entry can match is allowed
without the group, CIDR, port and allow-list look-ups (with the default pack: every loopback
and internal connect). The agent is an adversary, so the skip must never open a door a rule
closes: a rule that names loopback (by scope, or with no scope at all) takes loopback out of
the skip, and so does a reload that brings such a rule. Shown through `agenttrace run` as a
user starts it, in enforce mode, on loopback."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

from conftest import AGENTTRACE, need_bpf
from harness import end_process, loopback_listener, read_jsonl, wait_until

PY = sys.executable

LOOPBACK_RULE = """\
rules:
  - id: test-loopback-port
    description: a loopback port no agent may reach
    category: egress
    severity: high
    on: [connect]
    match:
      dst: {{scopes: [loopback], ports: [{port}]}}
    action: block
"""
CONNECT = "import socket, sys; print(socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1]))))"


def _kp(rule_text=None, tmp_path=None):
    from agenttrace.match.policy import compile_policy
    from agenttrace.match.rules import default_rule_paths, load_rules
    paths = list(default_rule_paths())
    if rule_text is not None:
        f = tmp_path / "extra.yaml"
        f.write_text(rule_text)
        paths.append(str(f))
    return compile_policy(load_rules(paths))


def test_free_scopes_of_the_default_pack_and_of_rules_that_name_loopback(tmp_path):
    from agenttrace.kernel.maps import free_scopes, plan_net
    from agenttrace.match.policy import SCOPE_EXTERNAL, SCOPE_INTERNAL, SCOPE_LOOPBACK, SCOPE_METADATA
    kp = _kp()
    # the default pack names metadata (any port) and external (miner and SSH ports) only
    assert free_scopes(kp, plan_net(kp)) == SCOPE_LOOPBACK | SCOPE_INTERNAL
    kp = _kp(LOOPBACK_RULE.format(port=4242), tmp_path)
    assert free_scopes(kp, plan_net(kp)) == SCOPE_INTERNAL
    # a port rule with no scope applies to every scope: nothing is skipped
    from harness import block_port_rule
    kp = _kp(textwrap.dedent(block_port_rule(4243)), tmp_path)
    assert free_scopes(kp, plan_net(kp)) == 0
    assert SCOPE_METADATA and SCOPE_EXTERNAL    # the other two bits exist and are never free here


def test_loopback_rule_blocks_through_the_skip_and_after_a_reload(tmp_path, agent_tree):
    need_bpf()
    srv, port = loopback_listener()
    other, oport = loopback_listener()
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    out = tmp_path / "run.jsonl"
    a = agent_tree.agent("lo")
    from agenttrace.match.rules import default_rule_paths
    args = [AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "--mode", "enforce", "-o", str(out)]
    for p in list(default_rule_paths()) + [str(rules)]:
        args += ["--rules", p]
    tracer = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and b'"started"' in out.read_bytes() or tracer.poll() is not None)
        assert tracer.poll() is None, tracer.stderr.read()
        # loopback is free under the default pack: allowed
        assert int(agent_tree.run(a, [PY, "-c", CONNECT, str(port)]).stdout) == 0
        # a reload brings a rule on that loopback port: the skip must stop covering loopback
        rules.write_text(LOOPBACK_RULE.format(port=port))
        os.kill(tracer.pid, signal.SIGHUP)
        assert wait_until(lambda: [r for r in read_jsonl(out) if r.get("phase") == "reloaded"], timeout=30), \
            [r for r in read_jsonl(out) if r.get("kind") == "lifecycle"]
        assert int(agent_tree.run(a, [PY, "-c", CONNECT, str(port)]).stdout) == errno.EPERM
        # other loopback ports still pass (loopback is looked up, not denied)
        assert int(agent_tree.run(a, [PY, "-c", CONNECT, str(oport)]).stdout) == 0
        blocked = wait_until(lambda: [r for r in read_jsonl(out) if r.get("kind") == "connect"
                                      and r["net"]["dst"]["port"] == port and r["net"]["verdict"] == "blocked"])
        assert blocked and blocked[0]["net"]["dst"]["scope"] == "loopback"
    finally:
        srv.close()
        other.close()
        end_process(tracer)
