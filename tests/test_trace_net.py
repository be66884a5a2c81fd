"""Connect events from real sockets in agent cgroups, with the kernel-reported outcome."""
import os
import socket
import sys

import pytest

PY = sys.executable


def _connects(sess, port):
    return [r for r in sess.of("connect") if r["net"]["dst"]["port"] == port]


def _free_port(family=socket.AF_INET, addr="127.0.0.1"):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((addr, 0))
    port = s.getsockname()[1]
    s.close()
    return port


# With listen on, the results come from its sock_ops program (state changes asked for at
# connect); without, from the sock:inet_sock_set_state tracepoint (probes/net.c): the same records.
@pytest.mark.parametrize("features", [None, ("proc", "net")], ids=["sockops", "tracepoint"])
def test_tcp_established_and_refused(agent_tree, make_session, features):
    a = agent_tree.agent("net")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    open_port = srv.getsockname()[1]
    closed_port = _free_port()
    try:
        sess = make_session([agent_tree.root], **({"features": features} if features else {}))
        progs = sess.tracer.probes.bpf._obj["programs"] if hasattr(sess.tracer.probes.bpf, "_obj") else None
        if progs is not None:
            assert ("tracepoint__sock__inet_sock_set_state" in progs) == (features is not None)
        code = (
            "import socket, sys\n"
            f"s = socket.create_connection(('127.0.0.1', {open_port})); print(s.getsockname()[1]); s.close()\n"
            f"c = socket.socket(); print(c.connect_ex(('127.0.0.1', {closed_port})))\n"
        )
        r = agent_tree.run(a, [PY, "-c", code])
        src_port, err = map(int, r.stdout.split())
        assert err == 111
        ok = sess.wait_for(lambda: [c for c in _connects(sess, open_port) if c["net"]["result"] != "pending"])
        bad = sess.wait_for(lambda: [c for c in _connects(sess, closed_port) if c["net"]["result"] != "pending"])
    finally:
        srv.close()
    ok, bad = ok[0], bad[0]
    assert ok["net"]["result"] == "established"
    assert ok["net"]["verdict"] == "allowed"
    assert ok["net"]["proto"] == "tcp" and ok["net"]["family"] == "ipv4"
    assert ok["net"]["dst"] == {"addr": "127.0.0.1", "port": open_port, "scope": "loopback", "name": None}
    assert ok["net"]["src"] == {"addr": "127.0.0.1", "port": src_port}
    assert ok["agent"]["id"] == "net"
    assert ok["proc"]["exe"].startswith("/usr/bin/python3") or ok["proc"]["exe"] == PY
    assert bad["net"]["result"] == "refused" and bad["net"]["error"] == 111
    assert bad["proc"]["pid"] == ok["proc"]["pid"]


def test_udp_sendto_and_ipv6(agent_tree, make_session):
    a = agent_tree.agent("udp")
    srv6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv6.bind(("::1", 0))
    srv6.listen(4)
    p6 = srv6.getsockname()[1]
    try:
        sess = make_session([agent_tree.root])
        code = (
            "import socket\n"
            "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(50): u.sendto(b'x', ('127.0.0.1', 9))\n"   # 50 datagrams, one event
            f"s = socket.create_connection(('::1', {p6})); s.close()\n"
        )
        agent_tree.run(a, [PY, "-c", code])
        v6 = sess.wait_for(lambda: [c for c in _connects(sess, p6) if c["net"]["result"] == "established"])
        udp = sess.wait_for(lambda: _connects(sess, 9))
        sess.settle()
    finally:
        srv6.close()
    assert v6[0]["net"]["family"] == "ipv6" and v6[0]["net"]["dst"]["addr"] == "::1"
    assert v6[0]["net"]["dst"]["scope"] == "loopback"
    assert len(_connects(sess, 9)) == 1
    u = udp[0]["net"]
    assert u["proto"] == "udp" and u["op"] == "sendmsg" and u["result"] == "sent"


def test_connects_outside_agent_cgroups_are_not_seen(agent_tree, make_session):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    try:
        sess = make_session([agent_tree.root])
        socket.create_connection(("127.0.0.1", port)).close()     # from the test: not an agent
        a = agent_tree.agent("marker")
        agent_tree.run(a, [PY, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port})).close()"])
        sess.wait_for(lambda: [c for c in _connects(sess, port) if c["net"]["result"] == "established"])
        sess.settle()
    finally:
        srv.close()
    cs = _connects(sess, port)
    assert len(cs) == 1 and cs[0]["agent"]["id"] == "marker"
    assert cs[0]["proc"]["pid"] != os.getpid()
