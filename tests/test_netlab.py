"""The test network itself: isolated, with real servers that behave like the real thing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from netlab import NetLab, cgroup2_mount  # fixtures netlab, netlab_fresh: conftest.py

STRATUM_CLIENT = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=10)
f = s.makefile("rwb")
def call(msg, n):
    f.write((json.dumps(msg) + "\n").encode()); f.flush()
    return [json.loads(f.readline()) for _ in range(n)]
out = {}
out["subscribe"] = call({"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}, 1)
out["authorize"] = call({"id": 2, "method": "mining.authorize", "params": ["wallet.worker", "x"]}, 3)
out["login"] = call({"id": 3, "jsonrpc": "2.0", "method": "login",
                     "params": {"login": "44AFFq5kSiGBoZ", "pass": "x", "agent": "XMRig/6.21.0 (Linux x86_64)"}}, 1)
print(json.dumps(out))
"""


def test_agent_netns_has_no_default_route(netlab):
    for fam in ("-4", "-6"):
        out = subprocess.run(["ip", fam, "-n", netlab.agent_ns, "route", "show", "table", "all"],
                             capture_output=True, text=True, check=True).stdout
        assert "default" not in out, out
    assert not [r for r in netlab.routes() if r.startswith(("0.0.0.0", "default"))]
    # Anything outside the lab prefixes is unreachable rather than routed somewhere real.
    r = netlab.python_in_agent(
        "import socket,errno\n"
        "s=socket.socket()\n"
        "try:\n s.connect(('8.8.8.8',53)); print('connected')\n"
        "except OSError as e: print(errno.errorcode[e.errno])\n")
    assert r.stdout.strip() == "ENETUNREACH", r


def test_ssh_login_with_the_lab_key_on_22_and_443(netlab):
    for port in netlab.ssh_ports:
        r = netlab.check_in_agent(netlab.ssh_argv(netlab.ssh_host, port, command=["true"]))
        assert r.returncode == 0, r.stderr
    r = netlab.check_in_agent(netlab.ssh_argv(netlab.internal_host, 22, command=["echo", "inside"]))
    assert r.stdout == "inside\n", r.stderr
    assert "Accepted publickey for root" in netlab.sshd_log()


def test_ipv6_ssh_pool_and_aaaa(netlab):
    for host in (netlab.ssh_host6, netlab.internal_host6):
        r = netlab.check_in_agent(netlab.ssh_argv(host, 22, command=["echo", "v6"]))
        assert r.stdout == "v6\n", r.stderr
    r = netlab.python_in_agent(STRATUM_CLIENT, netlab.pool_host6, "3333", check=True)
    assert json.loads(r.stdout)["subscribe"][0]["error"] is None
    r = netlab.check_in_agent(["getent", "ahostsv6", "bastion6.example.com"], check=True)
    assert r.stdout.split()[0] == netlab.ssh_host6


def test_remote_forward_opens_the_port_on_the_server(netlab_fresh):
    lab = netlab_fresh
    assert not lab.server_port_open(lab.ssh_host, 9000)
    ssh = lab.run_in_agent(lab.ssh_argv(lab.ssh_host, 22, "-N", "-R", "9000:127.0.0.1:8000"),
                           stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert lab.wait_server_port(lab.ssh_host, 9000, proc=ssh), ssh.stderr.read1() if ssh.poll() is not None else ""
    finally:
        ssh.terminate()
        ssh.wait()
    # The forward dies with the session; polled because sshd tears it down asynchronously.
    assert _closes(lab, 9000)


def _closes(lab, port) -> bool:
    import time
    for _ in range(200):
        if not lab.server_port_open(lab.ssh_host, port):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("port", [3333, 443])
def test_stratum_pool_answers_like_a_pool(netlab, port):
    before = len(netlab.server_events("stratum"))
    r = netlab.python_in_agent(STRATUM_CLIENT, netlab.pool_host, str(port), check=True)
    out = json.loads(r.stdout)
    sub = out["subscribe"][0]
    assert sub["id"] == 1 and sub["error"] is None
    assert sub["result"][0][1][0] == "mining.notify"
    auth = out["authorize"]
    assert auth[0] == {"id": 2, "result": True, "error": None}
    assert [m.get("method") for m in auth[1:]] == ["mining.set_difficulty", "mining.notify"]
    login = out["login"][0]
    assert login["result"]["status"] == "OK" and login["result"]["job"]["algo"] == "rx/0"
    got = netlab.server_events("stratum")[before:]
    assert [e["method"] for e in got] == ["mining.subscribe", "mining.authorize", "login"]
    assert {e["port"] for e in got} == {port}


def test_dns_resolver_over_udp_tcp_and_glibc(netlab):
    code = (
        "import dns.resolver, dns.message, dns.query, dns.rcode\n"
        f"ns = {netlab.dns_host!r}\n"
        "q = dns.message.make_query('pool.supportxmr.com', 'A')\n"
        "u = dns.query.udp(q, ns, timeout=5)\n"
        "t = dns.query.tcp(q, ns, timeout=5)\n"
        "n = dns.query.udp(dns.message.make_query('nothing.example', 'A'), ns, timeout=5)\n"
        "print(u.answer[0][0].to_text(), t.answer[0][0].to_text(), u.answer[0].ttl, dns.rcode.to_text(n.rcode()))\n")
    r = netlab.python_in_agent(code, check=True)
    assert r.stdout.split() == [netlab.pool_host, netlab.pool_host, "300", "NXDOMAIN"]
    # glibc's resolver (getent) reads the lab's resolv.conf, not the host's.
    r = netlab.check_in_agent(["getent", "ahostsv4", "git.corp.internal"], check=True)
    assert r.stdout.split()[0] == netlab.internal_host
    protos = {e["proto"] for e in netlab.server_events("dns") if e.get("query") == "pool.supportxmr.com"}
    assert protos == {"udp", "tcp"}


def test_http_and_dumb_git_clone(netlab, tmp_path):
    (netlab.http_root / "hello.txt").write_text("hello from the lab\n")
    r = netlab.python_in_agent(
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://{netlab.web_host}/hello.txt', timeout=10).read().decode(), end='')\n",
        check=True)
    assert r.stdout == "hello from the lab\n"
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    url = netlab.make_git_repo("lab.git")
    dest = tmp_path / "clone"
    netlab.check_in_agent(["git", "clone", "-q", url, str(dest)], check=True)
    assert (dest / "README").read_text() == "netlab repository\n"
    hosts = {e["host"] for e in netlab.server_events("http")}
    assert netlab.internal_host in hosts and netlab.web_host in hosts


def test_run_in_agent_puts_the_child_in_the_cgroup_before_exec(netlab):
    cg = cgroup2_mount() / f"agenttrace-netlab-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        # /proc/self/cgroup is read by the exec'd program itself, so it proves the move happened
        # before exec; the netns inode proves it left the host netns.
        r = netlab.check_in_agent(["sh", "-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net"],
                                  cgroup=cg, check=True)
        rel = "/" + str(cg.relative_to(cgroup2_mount()))
        assert f"0::{rel}" in r.stdout.splitlines()
        agent_ns_ino = os.stat(f"/var/run/netns/{netlab.agent_ns}").st_ino
        assert f"net:[{agent_ns_ino}]" in r.stdout
        # A path relative to the cgroup2 mount is accepted too.
        r = netlab.check_in_agent(["cat", "/proc/self/cgroup"], cgroup=rel, check=True)
        assert f"0::{rel}" in r.stdout.splitlines()
    finally:
        cg.rmdir()


def test_teardown_removes_namespaces_processes_and_files():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab = NetLab()
    with lab:
        ns = (lab.agent_ns, lab.server_ns)
        pids = [lab.sshd_proc.pid, lab.servers_proc.pid]
        sleeper = lab.run_in_agent(["sleep", "300"])
        pids.append(sleeper.pid)
        d = lab.dir
    for name in ns:
        assert not Path(f"/var/run/netns/{name}").exists()
    for pid in pids:
        # Reaped children leave no /proc entry (or a recycled pid that is not ours).
        st = Path(f"/proc/{pid}/stat")
        assert not st.exists() or st.read_text().split()[3] != str(os.getpid())
    assert not d.exists()


def test_lab_refuses_external_hosts_inside_a_node_subnet(monkeypatch):
    """On a node whose uplink sits in one of the lab's documentation ranges the daemon would
    count the lab's "external" hosts as internal: the lab says so instead of starting."""
    import ipaddress
    from agenttrace.enrich import nodenet
    from agenttrace.lab.netlab import DNS_HOST, NetLab, NetLabError
    monkeypatch.setattr(nodenet, "interface_networks",
                        lambda: [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network(f"{DNS_HOST}/24", strict=False)])
    with pytest.raises(NetLabError, match="inside this node.s subnet 198.51.100.0"):
        NetLab._check_external_hosts_are_foreign()
    monkeypatch.setattr(nodenet, "interface_networks", lambda: [ipaddress.ip_network("192.0.2.0/24")])
    NetLab._check_external_hosts_are_foreign()       # this VM's own uplink range: no lab host in it
