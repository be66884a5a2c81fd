"""The watched agent is an adversary: it cannot crash a reload, starve the reader, flood
others into blind spots, or outlive enforcement by killing the tracer (issue 16)."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from test_daemon import RULE, Daemon, _connect_errno, pin_dir  # noqa: F401  (fixture)

PY = sys.executable


def _unholdable_rules(first_port: int) -> str:
    # five blocks on one /32: the kernel's destination map has four slots per prefix, so the
    # rule set loads and lints but cannot be written into the maps (EnforceError at apply)
    return "rules:\n" + "".join(f"""
  - id: unholdable-{p}
    description: one of five blocks sharing a prefix
    category: egress
    severity: high
    on: [connect]
    match:
      dst: {{cidrs: ["127.0.0.1/32"], ports: [{p}]}}
    action: block
""" for p in range(first_port, first_port + 5))


def test_reload_that_cannot_be_held_keeps_the_old_policy(tmp_path, agent_tree, pin_dir):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=port))
    a = agent_tree.agent("a1")
    d = Daemon(tmp_path, agent_tree.root, rules, pin_dir)
    try:
        d.start()
        assert d.wait_record(lambda r: r.get("phase") == "started")
        assert _connect_errno(agent_tree, a, port) == errno.EPERM
        from agenttrace.rules import load_rules
        rules.write_text(_unholdable_rules(41001))
        load_rules([str(rules)])            # valid rules: only the maps refuse them
        d.proc.send_signal(signal.SIGHUP)
        failed = d.wait_record(lambda r: r.get("phase") == "reload_failed")
        assert failed, d.stderr()
        assert "more than 4 policy entries" in failed[0]["error"]
        assert d.proc.poll() is None, "a reload that cannot be applied took the daemon down"
        # the old rule still blocks, and the new set left nothing behind
        assert _connect_errno(agent_tree, a, port) == errno.EPERM
        with socket.socket() as s2:
            s2.bind(("127.0.0.1", 41001))
            s2.listen(4)
            assert _connect_errno(agent_tree, a, 41001) == 0
        # the kernel said so in the records too: blocked before and after the failed reload
        blocked = d.wait_record(lambda r: r.get("kind") == "connect" and r["net"]["dst"]["port"] == port
                                and r["net"]["verdict"] == "blocked")
        assert len(blocked) >= 2
        # and a good reload after the failed one still works
        rules.write_text(RULE.format(port=41002))
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_record(lambda r: r.get("phase") == "reloaded")
        assert _connect_errno(agent_tree, a, 41002) == errno.EPERM
    finally:
        d.stop()
        srv.close()
