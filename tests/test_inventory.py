"""pyroute2 in the product: the node's own subnets from netlink count as internal, and the
agents' connections that predate the daemon are inventoried from sock_diag at its start."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid


from harness import Daemon, loopback_listener

PY = sys.executable

REPORT = """
rules:
  - id: test-inventory-port-{port}
    description: test rule, reports connections to one loopback port
    category: tunnel
    severity: high
    on: [connect]
    match:
      dst: {{cidrs: ["127.0.0.1/32"], ports: [{port}]}}
    action: report
"""


def test_node_subnets_come_from_the_interfaces(require_bpf):
    """In a netns of our own: a public address's subnet is added, private ones are covered by
    the defaults already, loopback is never internal."""
    ns = f"at-inv-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"], ["ip", "link", "set", "d0", "up"],
                    ["ip", "addr", "add", "203.0.113.5/24", "dev", "d0"],
                    ["ip", "addr", "add", "10.1.2.3/24", "dev", "d0"],
                    ["ip", "-6", "addr", "add", "2001:db8:7::5/64", "dev", "d0", "nodad"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        code = ("from agenttrace.enrich.nodenet import node_subnets; from agenttrace.enrich.scope import Scoper;"
                "n = node_subnets(); s = Scoper(internal=n);"
                "print(n, s.scope('203.0.113.99'), s.scope('198.51.100.1'), s.scope('10.1.2.9'))")
        r = subprocess.run(["ip", "netns", "exec", ns, PY, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("] ")[0] + "]" == "['203.0.113.0/24', '2001:db8:7::/64']"
        assert r.stdout.split("] ")[1].split() == ["internal", "external", "internal"]
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def _daemon(tmp_path, agent_tree, rules, extra=""):
    return Daemon(tmp_path, agent_tree.root, rules, pin_dir=None, extra=extra, mode="monitor")


def test_connections_opened_before_the_daemon_show_after_it_starts(tmp_path, agent_tree):
    srv, port = loopback_listener()
    rules = tmp_path / "rules.yaml"
    rules.write_text(REPORT.format(port=port))
    a = agent_tree.agent("inv1")
    # the "tunnel": connected before any tracer runs, then idle
    client = agent_tree.spawn(a, [PY, "-c", f"import socket, sys, time; s = socket.create_connection(('127.0.0.1', {port}));"
                                  "print(s.getsockname()[1], flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    # and a server inside the agent, with a connection from outside already accepted
    server = agent_tree.spawn(a, [PY, "-c", "import socket, time; l = socket.socket(); l.bind(('127.0.0.1', 0));"
                                  "l.listen(); print(l.getsockname()[1], flush=True); c, _ = l.accept(); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    d = None
    try:
        cport = int(client.stdout.readline())
        acc, _ = srv.accept()
        sport = int(server.stdout.readline())
        outside = socket.create_connection(("127.0.0.1", sport))
        time.sleep(0.3)
        d = _daemon(tmp_path, agent_tree, rules).start()
        inv = d.wait_record(lambda r: (r.get("net") or {}).get("op") == "inventory" and r["kind"] == "connect")
        assert len(inv) == 1, inv
        c = inv[0]
        assert c["agent"]["id"] == "inv1" and c["proc"]["pid"] == client.pid
        assert c["net"]["dst"] == {"addr": "127.0.0.1", "port": port, "scope": "loopback", "name": None}
        assert c["net"]["src"]["port"] == cport and c["net"]["result"] == "established" and c["net"]["cookie"]
        alerts = d.wait_record(lambda r: r.get("kind") == "alert" and r["rule"]["id"] == f"test-inventory-port-{port}")
        assert alerts and alerts[0]["net"]["op"] == "inventory" and alerts[0]["proc"]["pid"] == client.pid
        acc_recs = d.wait_record(lambda r: r["kind"] == "listen" and (r.get("net") or {}).get("op") == "inventory")
        assert len(acc_recs) == 1 and acc_recs[0]["proc"]["pid"] == server.pid
        assert acc_recs[0]["net"]["what"] == "accept" and acc_recs[0]["net"]["local"]["port"] == sport
        assert acc_recs[0]["net"]["remote"]["port"] == outside.getsockname()[1]
        started = [r for r in d.records() if r.get("phase") == "started"]
        from agenttrace.enrich.nodenet import node_subnets
        assert started[0].get("node_subnets", []) == node_subnets()
        outside.close()
        acc.close()
    finally:
        if d is not None:
            assert d.stop() == 0
        for p in (client, server):
            p.kill()
            p.wait()
        srv.close()
