"""A TCP flow's owner is learned at connect() (probes/net.c's pending_conn entry), not by the
flow's first segment: the SYN and every bare segment after it make no flow entry, and the
entry made by the first payload, either way, carries the connect caller.

Shown through `agenttrace run --cgroup` as a user starts it, on loopback: the connect caller
exits before the server's first byte arrives (a forked child holds the socket), and both ways
of the flow are still that caller's, in its agent; a refused connect is reported refused and
makes no flow. The kernel-level test reads the maps: no flow entry for a refused or a silent
connect, and the connect's entry goes once its flow has one or its socket is reset."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import AGENTTRACE, need_bpf
from harness import end_process, free_port, loopback_listener, read_jsonl, wait_until

PY = sys.executable

# connect, then fork: the child keeps the socket and answers the server's banner; the caller
# exits at once, before the server says anything
CALLER = r"""
import os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(os.getpid(), s.getsockname()[1], flush=True)
if os.fork() == 0:
    s.recv(64)
    s.sendall(b"SSH-2.0-OpenSSH_9.2p1 child\r\n")
    s.close()
    os._exit(0)
os._exit(0)
"""
REFUSED = r"""
import os, socket, sys
print(os.getpid(), socket.socket().connect_ex(("127.0.0.1", int(sys.argv[1]))), flush=True)
"""


def test_flow_owner_is_the_connect_caller_after_it_exited(tmp_path, agent_tree):
    need_bpf()
    a = agent_tree.agent("owner")
    out = tmp_path / "run.jsonl"
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    srv, port = loopback_listener()
    conn = None
    try:
        assert wait_until(lambda: out.exists() and b'"started"' in out.read_bytes() or tracer.poll() is not None)
        assert tracer.poll() is None, tracer.stderr.read()
        caller = agent_tree.spawn(a, [PY, "-c", CALLER, str(port)], stdout=subprocess.PIPE)
        pid, cport = (int(x) for x in caller.stdout.readline().split())
        assert caller.wait(timeout=30) == 0
        conn, _ = srv.accept()
        conn.settimeout(30)
        conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 server\r\n")
        assert conn.recv(64).startswith(b"SSH-2.0-")   # the child's answer: it reads, then writes

        closed = free_port()
        r = agent_tree.run(a, [PY, "-c", REFUSED, str(closed)])
        rpid, err = (int(x) for x in r.stdout.split())
        assert err != 0

        def mine():
            return [f for f in read_jsonl(out) if f.get("kind") == "flow"
                    and {f["net"]["src"].get("port"), f["net"]["dst"].get("port")} == {cport, port}]
        both = wait_until(lambda: (lambda fs: fs if {f["flow"]["direction"] for f in fs} >= {"egress", "ingress"}
                                   else None)(mine()))
        assert both, [r for r in read_jsonl(out) if r.get("kind") == "flow"]
        for f in both:
            # the server's banner reached a socket whose caller was gone (ingress, softirq),
            # the child wrote the answer: both are the caller's, as when the SYN named it
            assert f["proc"]["pid"] == pid, f
            assert f["agent"]["cgroup_id"] == os.stat(a).st_ino and f["agent"]["id"] == "owner"
            assert f["flow"]["protocol"] == "ssh"
        refused = wait_until(lambda: [c for c in read_jsonl(out) if c.get("kind") == "connect"
                                      and c["net"]["dst"]["port"] == closed and c["net"].get("result") == "refused"])
        assert refused and refused[0]["proc"]["pid"] == rpid
        assert not [f for f in read_jsonl(out) if f.get("kind") == "flow"
                    and closed in (f["net"]["src"].get("port"), f["net"]["dst"].get("port"))]
    finally:
        if conn is not None:
            conn.close()
        srv.close()
        end_process(tracer)


SILENT = r"""
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
if sys.argv[2] == "rst":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"""


def test_no_flow_entry_without_a_payload(agent_tree, monkeypatch):
    """The maps themselves: a refused connect and a connected socket that never carries a byte
    make no flow_state entry; the connect's pending_conn entry stays until the socket is reset
    (a FIN leaves it: the peer may still send, and that flow is the caller's)."""
    need_bpf()
    from test_flow_probes import Kernel
    from agenttrace.kernel import wire as ev
    k = Kernel(agent_tree.root, monkeypatch)
    srv, port = loopback_listener()
    try:
        a = agent_tree.agent("quiet")
        closed = free_port()
        agent_tree.run(a, [PY, "-c", REFUSED, str(closed)])
        procs = {}
        for how in ("fin", "rst"):
            p = agent_tree.spawn(a, [PY, "-c", SILENT, str(port), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            procs[how] = (p, int(p.stdout.readline()))
        conns = [srv.accept()[0] for _ in procs]
        est = k.wait(lambda: (lambda rs: rs if len(rs) >= 2 else None)(
            [r for r in k.of(ev.EV_CONN_RESULT) if r.dport == port and r.result == ev.RESULT_ESTABLISHED]))
        assert est
        cookies = {c.cookie for c in k.of(ev.EV_CONNECT) if c.dport in (port, closed)}
        assert len(cookies) == 3
        refused = k.wait(lambda: [r for r in k.of(ev.EV_CONN_RESULT) if r.dport == closed])
        assert refused and refused[0].result == ev.RESULT_REFUSED
        fs = k.p["flow_state"]
        assert not [key for key in fs.keys() if key.value in cookies]
        pend = k.p["pending_conn"]

        def pending_cookies():
            return {v.cookie for v in pend.values()} & cookies
        assert len(pending_cookies()) == 2        # the refused one went with its result
        for how, (p, _cport) in procs.items():
            p.stdin.write(b"\n")
            p.stdin.flush()
            assert p.wait(timeout=30) == 0
        # the reset socket's entry is gone, the closed-with-FIN one's stays for its peer
        assert wait_until(lambda: len(pending_cookies()) == 1, timeout=20)
        assert not [key for key in fs.keys() if key.value in cookies]
        for c in conns:
            c.close()
    finally:
        srv.close()
        k.close()


ACCEPTOR = r"""
import socket, sys
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
for how in sys.argv[1:]:
    c, _ = s.accept()
    if how == "talk":
        c.sendall(b"SSH-2.0-OpenSSH_9.2p1 acceptor\r\n")
    c.close()
"""


def test_accepted_socket_closed_without_a_byte_makes_no_flow_entry(agent_tree, monkeypatch):
    """An accepted socket whose only segments out are bare (its FIN on close, what a connect
    storm's listener does) makes no flow_state entry: nothing is pending and its way is over.
    One that talks still gets its flow record, with the acceptor as owner."""
    need_bpf()
    from test_flow_probes import Kernel
    from agenttrace.kernel import wire as ev
    k = Kernel(agent_tree.root, monkeypatch)
    try:
        a = agent_tree.agent("acceptor")
        srv = agent_tree.spawn(a, [PY, "-c", ACCEPTOR, "quiet", "talk"], stdout=subprocess.PIPE)
        port = int(srv.stdout.readline())
        # the clients are outside the agent: only the acceptor's sockets are agent sockets
        quiet = socket.create_connection(("127.0.0.1", port), timeout=30)
        assert quiet.recv(64) == b""           # the acceptor's FIN
        talk = socket.create_connection(("127.0.0.1", port), timeout=30)
        assert talk.recv(64).startswith(b"SSH-2.0-")
        assert srv.wait(timeout=30) == 0
        acc = k.wait(lambda: (lambda rs: rs if len(rs) >= 2 else None)(
            k.of(ev.EV_LISTEN, what=ev.LISTEN_ACCEPT, lport=port)))
        assert acc and len(acc) == 2
        by_port = {r.rport: r for r in acc}
        qc, tc = by_port[quiet.getsockname()[1]].cookie, by_port[talk.getsockname()[1]].cookie
        out = k.wait(lambda: [f for f in k.of(ev.EV_FLOW) if f.cookie == tc and f.direction == ev.DIR_EGRESS])
        assert out and out[0].h.tgid == srv.pid and out[0].proto_hint == ev.PROTO_SSH
        keys = {key.value for key in k.p["flow_state"].keys()}
        assert qc not in keys and tc in keys
        assert not [f for f in k.of(ev.EV_FLOW) if f.cookie == qc]
        quiet.close()
        talk.close()
    finally:
        k.close()
