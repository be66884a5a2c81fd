"""Connect rules indexed by destination port (match/engine.py) fire exactly what the unindexed
engine fires, rule for rule and in the same order, over ports, scopes, rules that name ports,
ranges and none, and a kernel-decided rule (whose record's policy_rule answers, not its port)."""
import random
import textwrap

from agenttrace.match.engine import Engine
from agenttrace.match.rules import default_rule_paths, load_rules
from agenttrace.session.event import Event

PORT_RULES = "rules:\n" + "".join(textwrap.indent(textwrap.dedent(f"""\
    - id: gen-port-{i}
      description: generated test rule naming two ports
      category: egress
      severity: low
      on: [connect]
      match:
        dst: {{ports: [{20000 + i}, {30000 + i}]{', scopes: [external]' if i % 3 == 0 else ''}}}
      action: report
    """), "  ") for i in range(120)) + textwrap.indent(textwrap.dedent("""\
    - id: gen-range
      description: generated test rule naming a port range
      category: egress
      severity: low
      on: [connect]
      match:
        dst: {ports: ["20005-20010"]}
      action: report
    """), "  ")


def _connect(port, scope, addr="198.51.100.9", policy_rule=None):
    net = {"proto": "tcp", "family": "ipv4", "src": {"addr": "10.0.0.2", "port": 40000},
           "dst": {"addr": addr, "port": port, "scope": scope}, "verdict": "allowed", "result": "established"}
    if policy_rule:
        net["policy_rule"] = policy_rule
    return {"ts": "2026-01-01T00:00:00.000000000Z", "kind": "connect", "node": "n",
            "agent": {"id": "a", "cgroup": "/a", "cgroup_id": 7},
            "proc": {"pid": 5, "ppid": 1, "uid": 0, "comm": "curl", "exe": "/usr/bin/curl", "args": ["curl"],
                     "exec_id": "x", "parent_exec_id": None, "ancestry": []}, "net": net}


def test_port_index_fires_what_the_unindexed_engine_fires(tmp_path):
    f = tmp_path / "ports.yaml"
    f.write_text(PORT_RULES)
    rs = load_rules(default_rule_paths() + [str(f)])
    fast, slow = Engine(rs), Engine(rs)
    slow._port_kinds = frozenset()
    assert "connect" in fast._port_kinds
    rnd = random.Random(15)
    ports = [20000, 20005, 20007, 20119, 30003, 30119, 22, 443, 3333, 53, 65535, None]
    for n in range(600):
        rec = _connect(rnd.choice(ports), rnd.choice(["external", "internal", "loopback", "metadata"]),
                       addr=rnd.choice(["198.51.100.9", "169.254.169.254", "10.1.2.3", "127.0.0.1"]))
        a = [al.record["rule"]["id"] for al in fast.process(Event("connect", n, dict(rec), 5, 7))]
        b = [al.record["rule"]["id"] for al in slow.process(Event("connect", n, dict(rec), 5, 7))]
        assert a == b, rec
    assert fast.stats["matched"] == slow.stats["matched"]
    assert fast.stats["matched"]["gen-port-7"] > 0 and fast.stats["matched"]["gen-range"] > 0
    assert fast.stats["matched"]["gen-port-3"] > 0      # the external-only one, on its ports


def test_port_index_is_rebuilt_when_rules_change(tmp_path):
    f = tmp_path / "ports.yaml"
    f.write_text(PORT_RULES)
    eng = Engine(load_rules([str(f)]))
    fired = lambda: [al.record["rule"]["id"] for al in eng.process(Event("connect", 1, _connect(20001, "external"), 5, 7))]
    assert fired() == ["gen-port-1"]
    f.write_text(PORT_RULES.replace("20001", "20999"))
    eng.swap_rules(load_rules([str(f)]))
    assert fired() == []
