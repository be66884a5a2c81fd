"""A record the kernel could not attribute (a flow segment or DNS answer in softirq context,
tgid 0) takes its owner from the connect that made the socket, by socket cookie
(Enricher._remember_socket / _owner): pid and agent cgroup ids of 32 and 64 bits come back
whole, and the memory holds the newest 65,536 sockets."""
from __future__ import annotations

import ctypes as C
import socket

from agenttrace import session
from agenttrace.kernel import wire as E


def _tracer():
    opts = session.SessionOptions(cgroups=[])
    return session.build(opts, [], ruleset=session.load_ruleset(opts))


def _connect(cookie, tgid, agent):
    c = E.Connect()
    c.h.type, c.h.size, c.h.pid, c.h.tgid = E.EV_CONNECT, C.sizeof(c), tgid, tgid
    c.h.cgroup_id = c.h.agent_cgroup_id = agent
    c.cookie, c.family, c.protocol, c.dport = cookie, socket.AF_INET, 17, 53
    lo = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1")
    C.memmove(C.addressof(c) + E.Connect.daddr.offset, lo, 16)
    return bytes(c)


def _flow(cookie):
    f = E.Flow()
    f.h.type, f.h.size = E.EV_FLOW, C.sizeof(f)
    f.cookie, f.family, f.dport, f.sport = cookie, socket.AF_INET, 53, 40000
    return bytes(f)


def test_unattributed_flow_takes_the_connects_owner():
    t = _tracer()
    agent = (1 << 63) | 0x1234_5678_9ABC        # cgroup ids use all 64 bits
    pid = 0xFFFF_FFF0
    rec = _connect(77, pid, agent)
    t._on_view(memoryview(rec), len(rec))
    events = t.enrich(E.EV_FLOW, E.Flow.from_buffer_copy(_flow(77)))
    assert [(ev.pid, ev.agent_cgroup_id) for ev in events] == [(pid, agent)]
    # an unknown cookie stays unattributed
    (ev,) = t.enrich(E.EV_FLOW, E.Flow.from_buffer_copy(_flow(78)))
    assert ev.pid == 0


def test_socket_memory_keeps_the_newest_65536():
    t = _tracer()
    enr = t.enrich
    for cookie in range(1, 65536 + 101):
        enr._remember_socket(cookie, 1000 + cookie % 7, 42)
    assert len(enr.sockets) == 65536
    assert 100 not in enr.sockets and 101 in enr.sockets
    enr._remember_socket(101, 5, 43)            # remembered again: newest now
    enr._remember_socket(10**9, 6, 44)
    assert 101 in enr.sockets and 102 not in enr.sockets
