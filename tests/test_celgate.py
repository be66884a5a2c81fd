"""A CEL condition decided from its first conjunct (match/celgate.py) must give CEL's answer."""
import pytest

from agenttrace.match.celgate import gate
from agenttrace.match.engine import Engine
from agenttrace.match.rules import default_rule_paths, load_rules
from agenttrace.session.event import Event


def test_gate_decides_only_what_the_first_conjunct_settles():
    g = gate('has(proc.ssh) && proc.ssh.tunnel')
    assert g({"proc": {}}) is False
    assert g({"proc": {"ssh": {}}}) is None           # CEL decides the rest
    assert g({}) is None                               # missing parent: CEL's error path
    g = gate('net.what == "listen" && !(net.local.addr.startsWith("127."))')
    assert g({"net": {"what": "accept"}}) is False
    assert g({"net": {"what": "listen"}}) is None
    assert g({"net": {"what": 3}}) is None             # not a string: CEL's type error
    g = gate('kind == "escape"')
    assert g({"kind": "escape"}) is True and g({"kind": "exec"}) is False
    assert gate('x.y == "a||b" && z')({"x": {"y": "c"}}) is False


@pytest.mark.parametrize("src", ['a.b == "x" && c || d', 'a.b == "x" ? c : d', '(a.b == "x" || y) && z',
                                 '!has(a.b) && c', 'lists.x == "y" && z', 'a.b == r"x" && c'])
def test_no_gate_where_a_false_first_conjunct_does_not_decide(src):
    assert gate(src) is None


def _records():
    base = {"ts": "2026-01-01T00:00:00.000000000Z", "node": "n",
            "agent": {"id": "a", "cgroup": "/a", "cgroup_id": 7}}
    proc = {"pid": 5, "ppid": 1, "uid": 0, "comm": "ssh", "exe": "/usr/bin/ssh", "args": ["ssh", "h"],
            "exec_id": "x", "parent_exec_id": None, "ancestry": []}
    yield {**base, "kind": "exec", "proc": proc}
    yield {**base, "kind": "exec", "proc": {**proc, "ssh": {"tunnel": True, "decided_by": ["config"]}}}
    yield {**base, "kind": "exec", "proc": {**proc, "args_truncated": True, "comm": "bash", "exe": "/bin/bash"}}
    for what, addr in (("accept", "0.0.0.0"), ("listen", "0.0.0.0"), ("listen", "127.0.0.1")):
        yield {**base, "kind": "listen", "proc": proc,
               "net": {"proto": "tcp", "family": "ipv4", "what": what, "local": {"addr": addr, "port": 9}}}


def test_engine_with_gates_fires_what_cel_alone_fires():
    rs = load_rules(default_rule_paths())
    fast, slow = Engine(rs), Engine(rs)
    slow._gates = {}
    for rec in _records():
        a = [al.record["rule"]["id"] for al in fast.process(Event(rec["kind"], 1, dict(rec), 5, 7))]
        b = [al.record["rule"]["id"] for al in slow.process(Event(rec["kind"], 1, dict(rec), 5, 7))]
        assert a == b, rec
    assert fast.stats["matched"] == slow.stats["matched"]
    assert fast.stats["matched"]["tunnel-listen-external"] == 1
    assert fast.stats["matched"]["tunnel-ssh-config-forwarding"] == 1
