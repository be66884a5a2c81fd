"""The engine's indexes (match/engine.py) fire exactly what the unindexed engine fires, rule
for rule and in the same order: connect rules by destination port (over ports, scopes, rules
that name ports, ranges and none; rules naming hosts skipped for records without a name), exec
rules by the basenames of the exact paths they name (candidates cached per program)."""
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


EXEC_RULES = "rules:\n" + "".join(textwrap.indent(textwrap.dedent(f"""\
    - id: gen-path-{i}
      description: generated test rule naming one exact path
      category: exec
      severity: low
      on: [exec]
      match:
        exe: {{paths: [/opt/gen{i}/bin/tool{i % 7}], args_regex: ["--flag{i % 5}"]}}
      action: report
    """), "  ") for i in range(60)) + textwrap.indent(textwrap.dedent("""\
    - id: gen-path-wild
      description: generated test rule naming a wildcard path
      category: exec
      severity: low
      on: [exec]
      match:
        exe: {paths: ["/opt/gen*/bin/tool3"]}
      action: report
    """), "  ")


def test_exact_path_rules_are_gated_by_their_basenames(tmp_path):
    from agenttrace.match.rules import load_rules as load
    f = tmp_path / "paths.yaml"
    f.write_text(EXEC_RULES)
    rs = load(default_rule_paths() + [str(f)])
    assert rs.get("gen-path-3").gate >= {"tool3"} and rs.get("gen-path-wild").gate is None
    ungated = load(default_rule_paths() + [str(f)])      # the reference: no rule has a gate
    for r in ungated.rules:
        object.__setattr__(r, "gate", None)
        object.__setattr__(r, "exe_prefixes", None)
    fast, slow = Engine(rs), Engine(ungated)
    assert not slow._gate_ix
    rnd = random.Random(13)
    for n in range(400):
        i = rnd.randrange(70)
        exe = rnd.choice([f"/opt/gen{i}/bin/tool{i % 7}", f"/usr/bin/tool{i % 7}", "/usr/bin/ssh", "/bin/true"])
        rec = {**_connect(1, "external"), "kind": "exec"}
        del rec["net"]
        rec["proc"] = {**rec["proc"], "exe": exe, "comm": exe.rsplit("/", 1)[-1][:15],
                       "args": [exe, f"--flag{rnd.randrange(5)}"]}
        a = [al.record["rule"]["id"] for al in fast.process(Event("exec", n, dict(rec), 5, 7))]
        b = [al.record["rule"]["id"] for al in slow.process(Event("exec", n, dict(rec), 5, 7))]
        assert a == b, rec
    assert fast.stats["matched"] == slow.stats["matched"]
    assert sum(v for k, v in fast.stats["matched"].items() if k.startswith("gen-path-")) > 10


def test_name_index_fires_what_the_unindexed_engine_fires():
    # connects with and without a resolved name, to names the pack's domain rules list and
    # others: skipping name rules for unnamed records changes no alert and no match count
    rs = load_rules(default_rule_paths())
    fast, slow = Engine(rs), Engine(rs)
    slow._port_kinds = frozenset()
    names = [None, "", "pool.supportxmr.com", "api.example.test", "x.trycloudflare.com", "metadata.google.internal"]
    rnd = random.Random(16)
    for n in range(400):
        rec = _connect(rnd.choice([443, 3333, 80, 22, None]), rnd.choice(["external", "internal", "loopback"]))
        name = rnd.choice(names)
        if name is not None:
            rec["net"]["dst"]["name"] = name
        a = [al.record["rule"]["id"] for al in fast.process(Event("connect", n, dict(rec), 5, 7))]
        b = [al.record["rule"]["id"] for al in slow.process(Event("connect", n, dict(rec), 5, 7))]
        assert a == b, rec
    assert fast.stats["matched"] == slow.stats["matched"]
    assert fast.stats["matched"]["mining-pool-domain"] > 0 and fast.stats["matched"]["tunnel-service-domain"] > 0


def test_gate_candidates_are_cached_per_program_and_rebuilt_when_rules_change(tmp_path):
    rs = load_rules(default_rule_paths())
    eng = Engine(rs)

    def exec_rec(exe, args, names=None):
        proc = {"pid": 9, "ppid": 1, "uid": 0, "comm": exe.rsplit("/", 1)[-1][:15], "exe": exe, "args": args,
                "exec_id": "x", "parent_exec_id": None, "ancestry": []}
        if names is not None:
            proc["identity"] = {"names": names}
        return {"ts": "2026-01-01T00:00:00.000000000Z", "kind": "exec", "node": "n",
                "agent": {"id": "a", "cgroup": "/a", "cgroup_id": 7}, "proc": proc}

    def fired(rec, e=eng):
        return [al.record["rule"]["id"] for al in e.process(Event("exec", 1, rec, 9, 7))]

    assert fired(exec_rec("/usr/bin/true", ["true"])) == []
    assert fired(exec_rec("/opt/x/xmrig", ["xmrig"])) == ["mining-binary-exec"]
    assert fired(exec_rec("/usr/bin/true", ["true"], names=["xmrig"])) == ["mining-binary-exec"]
    assert fired(exec_rec("/usr/bin/true", ["true"], names=[{"not": "a name"}])) == []    # unhashable: uncached
    assert fired(exec_rec("/opt/x/xmrig", ["xmrig"])) == []      # de-duplicated, still matched
    assert eng.stats["matched"]["mining-binary-exec"] == 3
    f = tmp_path / "nc.yaml"
    f.write_text(textwrap.dedent("""\
        rules:
          - id: any-true
            description: every exec of true, gated by its basename
            category: exec
            severity: low
            on: [exec]
            match: {exe: {basenames: ["true"]}}
            action: report
        """))
    eng.swap_rules(load_rules(default_rule_paths() + [str(f)]))
    assert fired(exec_rec("/usr/bin/true", ["true"])) == ["any-true"]


def test_a_repeated_connect_meets_the_candidates_of_the_one_before(tmp_path):
    """A repeat (enricher._connect_repeat) holds the record before's net and proc objects: when
    that one met no candidate the engine says so at once; a record with other parts, or rules
    swapped in between, is chosen for afresh, and one that meets rules still fires each time."""
    f = tmp_path / "ports.yaml"
    ports = PORT_RULES[:PORT_RULES.index("  - id: gen-range")]   # a range is a candidate everywhere
    f.write_text(ports)
    rs = load_rules(default_rule_paths() + [str(f)])
    eng = Engine(rs)
    quiet = _connect(57639, "loopback", addr="127.0.0.1")
    loud = _connect(20003, "external")
    for i in range(3):          # the same net and proc objects, as a repeat shares them
        assert eng.process(Event("connect", i, dict(quiet, ts=f"t{i}"), 5, 7)) == []
    assert eng._no_cand[2] is quiet["net"]
    fired = [eng.process(Event("connect", 10 + i, dict(loud, ts=f"u{i}"), 5, 7)) for i in range(3)]
    assert any(a.record["rule"]["id"] == "gen-port-3" for a in fired[0])
    assert eng.stats["matched"]["gen-port-3"] == 3          # met every time (the alert deduplicated)
    # new rules: the same parts are chosen for again, from the new rules
    f.write_text(ports.replace("20004", "57639"))   # gen-port-4: any scope
    eng.swap_rules(load_rules(default_rule_paths() + [str(f)]))
    got = eng.process(Event("connect", 20, dict(quiet, ts="v"), 5, 7))
    assert [a.record["rule"]["id"] for a in got if a.record["rule"]["id"].startswith("gen-")] == ["gen-port-4"]
