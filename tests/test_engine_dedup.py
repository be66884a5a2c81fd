"""Alert de-duplication, alert records, reload, CEL at run time, enforce-mode outcomes."""
from __future__ import annotations

import pytest

from agenttrace.clock import FakeClock
from agenttrace.match.engine import Engine, replay
from agenttrace.session.event import Event
from agenttrace.match.rules import RulesError, load_rules

RULES = """\
lists:
  bad_ports: [4444]
rules:
  - id: bad-port
    description: connects to a port nobody should use
    category: egress
    severity: high
    on: [connect]
    match: {dst: {ports: ["$bad_ports"]}}
    action: block
    tags: [T1041]
  - id: root-exec
    description: a CEL condition over the exec record and a list
    category: exec
    severity: medium
    on: [exec]
    condition: 'proc.uid == 0 && proc.args.exists(a, a in lists.bad_words)'
    action: kill
    message: "root ran {proc.exe} with {proc.args}"
  - id: short-span
    description: repeats are summarised after five seconds
    category: exec
    severity: low
    on: [exec]
    match: {exe: {basenames: [loop]}}
    dedup: {fields: [proc.exe], seconds: 5}
lists_more: null
"""


@pytest.fixture
def rules_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(RULES.replace("lists_more: null\n", "").replace(
        "lists:\n  bad_ports: [4444]\n", "lists:\n  bad_ports: [4444]\n  bad_words: [--evil]\n"))
    return p


def conn(agent, port, verdict="allowed", t=0):
    return Event("connect", t, {"ts": "2025-11-27T08:00:00Z", "kind": "connect", "node": "n",
                                "agent": {"id": agent, "cgroup": f"/agents/{agent}", "cgroup_id": 1},
                                "proc": {"pid": 321, "comm": "nc", "exe": "/usr/bin/nc", "args": ["nc"]},
                                "net": {"proto": "tcp", "dst": {"addr": "198.51.100.1", "port": port, "scope": "external"},
                                        "verdict": verdict}}, pid=321)


def ex(exe, args, uid=1000, agent="a1"):
    return Event("exec", 0, {"ts": "2025-11-27T08:00:00Z", "kind": "exec", "agent": {"id": agent},
                             "proc": {"pid": 0, "uid": uid, "comm": exe.rsplit("/", 1)[-1], "exe": exe, "args": args}})


def test_a_million_identical_alerts_become_one_plus_a_summary(rules_file):
    clock = FakeClock()
    eng = Engine(load_rules([rules_file]), clock=clock)
    out = []
    for _ in range(20_000):
        out += eng.process(conn("a1", 4444, verdict="blocked"))
    assert len(out) == 1 and out[0].record["rule"]["outcome"] == "blocked"
    assert eng.stats["suppressed"] == 19_999
    clock.advance(61)
    (s,) = eng.tick()
    assert s.record["rule"]["repeats"] == 19_999 and s.record["rule"]["outcome"] == "blocked"
    assert "19999" in s.record["rule"]["message"]
    assert eng.tick() == []
    # after the span the next one is a fresh alert
    assert len(eng.process(conn("a1", 4444))) == 1


def test_different_keys_and_agents_are_not_merged(rules_file):
    eng = Engine(load_rules([rules_file]), clock=FakeClock())
    out = eng.process(conn("a1", 4444)) + eng.process(conn("a2", 4444))
    e = conn("a1", 4444)
    e.record["net"]["dst"]["addr"] = "198.51.100.2"
    out += eng.process(e)
    assert len(out) == 3


def test_repeat_after_span_flushes_summary_before_new_alert(rules_file):
    clock = FakeClock()
    eng = Engine(load_rules([rules_file]), clock=clock)
    for _ in range(3):
        assert len(eng.process(ex("/opt/loop", ["loop"]))) <= 1
    clock.advance(6)
    out = eng.process(ex("/opt/loop", ["loop"]))
    assert [o.record["rule"].get("repeats") for o in out] == [2, None]


def test_dedup_memory_is_bounded_and_evictions_summarised(rules_file):
    eng = Engine(load_rules([rules_file]), clock=FakeClock(), max_dedup=4)
    out = []
    for port in range(2):
        out += eng.process(conn("a1", 4444))
    for i in range(6):
        out += eng.process(conn(f"b{i}", 4444))
    assert eng.stats["dedup_evictions"] == 3 and len(eng._dedup) == 4
    assert [o.record["rule"].get("repeats") for o in out].count(1) == 1   # a1's repeat was not lost


def test_alert_record_shape_and_message_template(rules_file):
    eng = Engine(load_rules([rules_file]), clock=FakeClock())
    (a,) = eng.process(ex("/usr/bin/tool", ["tool", "--evil"], uid=0))
    r = a.record
    assert r["kind"] == "alert" and r["trigger"] == "exec" and r["proc"]["exe"] == "/usr/bin/tool"
    assert r["rule"] == {"id": "root-exec", "category": "exec", "severity": "medium", "action": "kill",
                         "outcome": "reported", "tags": [], "message": "root ran /usr/bin/tool with tool --evil"}
    assert eng.process(ex("/usr/bin/tool", ["tool", "--evil"], uid=1000)) == []


def test_cel_runtime_error_does_not_fire_and_is_counted(rules_file):
    eng = Engine(load_rules([rules_file]), clock=FakeClock())
    # CEL's && absorbs an error when the other side is false, so make the other side true
    e = ex("/usr/bin/tool", ["tool", "--evil"])
    del e.record["proc"]["uid"]
    assert eng.process(e) == []
    assert eng.stats["cel_errors"] == 1


def test_failed_reload_keeps_old_rules(rules_file, tmp_path):
    eng = Engine(load_rules([rules_file]), clock=FakeClock())
    bad = tmp_path / "bad.yaml"
    bad.write_text(rules_file.read_text().replace("severity: high", "severity: extreme"))
    with pytest.raises(RulesError) as ei:
        eng.swap_rules(load_rules([bad]))
    assert f"{bad}:" in str(ei.value) and "severity" in str(ei.value)
    assert len(eng.process(conn("a1", 4444))) == 1         # old rules still in force
    good = tmp_path / "good.yaml"
    good.write_text(rules_file.read_text().replace("[4444]", "[5555]"))
    eng.swap_rules(load_rules([good]))
    assert eng.process(conn("a9", 4444)) == []
    assert len(eng.process(conn("a9", 5555))) == 1


def test_enforce_block_outcome_follows_the_kernel_verdict(rules_file):
    eng = Engine(load_rules([rules_file]), mode="enforce", clock=FakeClock())
    (a,) = eng.process(conn("a1", 4444, verdict="blocked"))
    assert a.record["rule"]["outcome"] == "blocked"
    (b,) = eng.process(conn("a2", 4444, verdict="allowed"))
    # the kernel did not block it: say so, never claim "blocked"
    assert b.record["rule"]["outcome"] == "reported" and "not done" in b.record["rule"]["message"]
    assert eng.stats["action_failures"] == 1


def test_monitor_mode_never_acts(rules_file):
    class Boom:
        def __getattr__(self, name):
            raise AssertionError("monitor mode must not act")
    eng = Engine(load_rules([rules_file]), mode="monitor", clock=FakeClock(), actions=Boom())
    (a,) = eng.process(ex("/usr/bin/tool", ["tool", "--evil"], uid=0))
    assert a.record["rule"]["outcome"] == "reported"


def test_bad_mode_and_bad_event_file(rules_file, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        Engine(load_rules([rules_file]), mode="enforcing")
    ev = tmp_path / "e.jsonl"
    ev.write_text('{"ts": "2025-11-27T08:00:00Z", "kind": "exec", "proc": {}}\n{not json\n')
    with pytest.raises(ValueError, match=r"e\.jsonl:2:"):
        replay([rules_file], str(ev))


def test_malformed_records_are_counted_not_raised(rules_file):
    eng = Engine(load_rules([rules_file]), clock=FakeClock())
    e = ex("/usr/bin/tool", [1, None, {"x": 1}])
    e.record["proc"]["exe"] = 42
    assert eng.process(e) == []
    c = conn("a1", "4444")
    c.record["net"]["dst"] = "198.51.100.1:4444"
    assert eng.process(c) == []
    assert eng.stats["errors"] >= 1 and eng.stats["last_error"]
    assert len(eng.process(conn("a1", 4444))) == 1     # and the engine keeps working


def test_repeats_of_a_rule_removed_by_reload_are_still_summarised(rules_file, tmp_path):
    eng = Engine(load_rules([rules_file]), clock=FakeClock())
    for _ in range(5):
        eng.process(conn("a1", 4444))
    other = tmp_path / "other.yaml"
    other.write_text(rules_file.read_text().replace("id: bad-port", "id: renamed-port"))
    eng.swap_rules(load_rules([other]))
    (s,) = eng.tick()
    assert s.record["rule"]["id"] == "bad-port" and s.record["rule"]["repeats"] == 4


def test_basename_gate_matches_exe_basename_or_truncated_comm(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("""\
rules:
  - id: long-name
    description: a basename longer than the kernel's 15-byte comm
    category: exec
    severity: low
    on: [exec]
    match: {exe: {basenames: [averyverylongtoolname]}}
""")
    rs = load_rules([f])
    assert rs.rules[0].gate == {"averyverylongtoolname", "averyverylongto"}
    eng = Engine(rs, clock=FakeClock())
    assert len(eng.process(ex("/opt/averyverylongtoolname", ["x"]))) == 1
    # the gate lets the truncated comm through, but the match wants the whole name: a long
    # name is matched on the exe basename only
    e = ex("/opt/renamed", ["y"])
    e.record["proc"]["comm"] = "averyverylongto"
    assert eng.process(e) == []
    assert eng.process(ex("/opt/other", ["z"])) == []
