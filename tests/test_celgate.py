"""A CEL condition decided from its first conjunct (match/celgate.py) must give CEL's answer."""
import pytest

from agenttrace.match.celgate import gate, has_field
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
    slow._needs_key = {}      # every rule a candidate, every condition through CEL
    for rec in _records():
        a = [al.record["rule"]["id"] for al in fast.process(Event(rec["kind"], 1, dict(rec), 5, 7))]
        b = [al.record["rule"]["id"] for al in slow.process(Event(rec["kind"], 1, dict(rec), 5, 7))]
        assert a == b, rec
    assert fast.stats["matched"] == slow.stats["matched"]
    assert fast.stats["matched"]["tunnel-listen-external"] == 1
    assert fast.stats["matched"]["tunnel-ssh-config-forwarding"] == 1


def test_has_field_names_what_the_first_conjunct_requires():
    assert has_field("has(proc.ssh) && proc.ssh.tunnel") == ("proc", "ssh")
    assert has_field("has(proc.fresh_exe)") == ("proc", "fresh_exe")
    for src in ("!has(proc.ssh) && x", "has(proc.ssh) || x", "proc.ssh.tunnel && has(proc.ssh)",
                "has(lists.x) && y", 'net.what == "listen" && z'):
        assert has_field(src) is None, src


def test_rules_needing_a_missing_key_are_not_candidates_and_still_fire_with_it():
    # the candidates of an exec depend on which of proc.ssh / proc.fresh_exe it carries: the
    # same program with and without them, in both orders, fires what CEL alone fires
    rs = load_rules(default_rule_paths())
    fast, slow = Engine(rs), Engine(rs)
    slow._gates, slow._needs_key = {}, {}
    assert fast._needs_key["exec"][0] == ("fresh_exe", "ssh")
    base = {"ts": "2026-01-01T00:00:00.000000000Z", "node": "n", "kind": "exec",
            "agent": {"id": "a", "cgroup": "/a", "cgroup_id": 7}}
    proc = {"pid": 5, "ppid": 1, "uid": 0, "comm": "x", "exe": "/tmp/x", "args": ["x"],
            "exec_id": "x", "parent_exec_id": None, "ancestry": []}
    fresh = {"path": "/tmp/x", "changed_age_s": 3.0, "modified_age_s": 3.0,
             "downloader": {"pid": 4, "comm": "curl", "exe": "/usr/bin/curl"}}
    ssh = {"tunnel": True, "decided_by": ["config"]}
    variants = [{}, {"fresh_exe": fresh}, {"ssh": ssh}, {"fresh_exe": fresh, "ssh": ssh}, {}]
    for extra in variants + variants[::-1]:
        rec = {**base, "proc": {**proc, **extra}}
        a = [al.record["rule"]["id"] for al in fast.process(Event("exec", 1, dict(rec), 5, 7))]
        b = [al.record["rule"]["id"] for al in slow.process(Event("exec", 1, dict(rec), 5, 7))]
        assert a == b, extra
    assert fast.stats["matched"] == slow.stats["matched"]
    assert fast.stats["matched"]["download-then-exec"] == 4
    assert fast.stats["matched"]["tunnel-ssh-config-forwarding"] == 4
    assert fast.stats["cel_errors"] == slow.stats["cel_errors"]


def test_connect_candidates_by_port_also_drop_rules_needing_a_missing_key():
    # gpu-holder-external-connect starts with has(proc.gpu): a connect without it does not
    # meet the rule, one with it still fires as CEL alone decides
    rs = load_rules(default_rule_paths())
    fast, slow = Engine(rs), Engine(rs)
    slow._gates, slow._needs_key = {}, {}
    assert "gpu" in fast._needs_key["connect"][0]
    base = {"ts": "2026-01-01T00:00:00.000000000Z", "node": "n", "kind": "connect",
            "agent": {"id": "a", "cgroup": "/a", "cgroup_id": 7}}
    proc = {"pid": 5, "ppid": 1, "uid": 0, "comm": "python3", "exe": "/usr/bin/python3", "args": ["python3"],
            "exec_id": "x", "parent_exec_id": None, "ancestry": []}
    gpu = {"sm_util_pct": 90, "mem_used_mib": 1000, "devices": [0]}
    for extra in ({}, {"gpu": gpu}, {}, {"gpu": gpu}):
        for scope, addr in (("external", "198.51.100.7"), ("loopback", "127.0.0.1")):
            net = {"proto": "tcp", "family": "ipv4", "op": "connect", "src": None,
                   "dst": {"addr": addr, "port": 8443, "scope": scope, "name": None},
                   "verdict": "allowed", "result": "established"}
            rec = {**base, "proc": {**proc, **extra}, "net": net}
            a = [al.record["rule"]["id"] for al in fast.process(Event("connect", 1, dict(rec), 5, 7))]
            b = [al.record["rule"]["id"] for al in slow.process(Event("connect", 1, dict(rec), 5, 7))]
            assert a == b, (extra, scope)
    assert fast.stats["matched"] == slow.stats["matched"]
    assert fast.stats["cel_errors"] == slow.stats["cel_errors"]
    assert fast.stats["matched"]["gpu-holder-external-connect"] == 2
