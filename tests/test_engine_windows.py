"""Window rules: count / count-distinct per agent over a span, bounded memory, fire once."""
from __future__ import annotations

import textwrap

import pytest

from agenttrace.clock import FakeClock
from agenttrace.match.engine import Engine
from agenttrace.session.event import Event
from agenttrace.match.rules import load_rules

SCAN = """\
rules:
  - id: scan
    description: distinct internal addr:port pairs per agent in a short span
    category: scan
    severity: high
    on: [connect]
    match: {dst: {scopes: [internal]}}
    window: {count: 30, distinct: [net.dst.addr, net.dst.port], seconds: 10}
    tags: [T1046]
  - id: burst
    description: many execs of anything in a short span (plain count)
    category: exec
    severity: low
    on: [exec]
    window: {count: 5, seconds: 2}
"""


@pytest.fixture
def rs(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text(SCAN)
    return load_rules([p])


def conn(agent, addr, port, scope="internal"):
    return Event("connect", 0, {"ts": "x", "kind": "connect", "agent": {"id": agent, "cgroup": f"/a/{agent}"},
                                "proc": {"pid": 10, "comm": "python3", "exe": "/usr/bin/python3", "args": []},
                                "net": {"proto": "tcp", "dst": {"addr": addr, "port": port, "scope": scope}}}, pid=10)


def ex(agent):
    return Event("exec", 0, {"ts": "x", "kind": "exec", "agent": {"id": agent},
                             "proc": {"pid": 11, "comm": "true", "exe": "/bin/true", "args": ["true"]}})


def feed(eng, clock, events, step=0.05):
    out = []
    for e in events:
        out += eng.process(e)
        clock.advance(step)
    return out


def test_40_port_scan_fires_once_and_summary_has_40(rs):
    clock = FakeClock()
    eng = Engine(rs, clock=clock)
    alerts = feed(eng, clock, [conn("a1", "10.0.0.5", p) for p in range(1, 41)])
    assert len(alerts) == 1
    a = alerts[0].record
    assert a["rule"]["id"] == "scan" and a["window"]["count"] == 30 and a["window"]["threshold"] == 30
    assert a["net"]["dst"]["port"] == 30 and "repeats" not in a["rule"]
    assert eng.tick() == []                      # episode still open
    clock.advance(11)
    (s,) = eng.tick()
    assert s.record["window"]["count"] == 40 and s.record["rule"]["repeats"] == 10
    assert eng.tick() == []


def test_repeated_pairs_do_not_count_and_other_agents_are_separate(rs):
    clock = FakeClock()
    eng = Engine(rs, clock=clock)
    # 200 connects to one mirror: one distinct pair
    assert feed(eng, clock, [conn("a1", "10.30.0.9", 3141)] * 200, step=0.01) == []
    # 20 ports each from two agents: neither reaches 30
    evs = [conn(ag, "10.0.0.5", p) for p in range(1, 21) for ag in ("a2", "a3")]
    assert feed(eng, clock, evs) == []
    # loopback is not internal
    assert feed(eng, clock, [conn("a4", "127.0.0.1", p, "loopback") for p in range(1, 60)]) == []


def test_slow_scan_outside_the_span_does_not_fire(rs):
    clock = FakeClock()
    eng = Engine(rs, clock=clock)
    # one new port every 0.5 s: at most 20 distinct pairs inside any 10 s span
    assert feed(eng, clock, [conn("a1", "10.0.0.5", p) for p in range(1, 100)], step=0.5) == []


def test_fires_again_in_a_new_episode(rs):
    clock = FakeClock()
    eng = Engine(rs, clock=clock)
    assert len(feed(eng, clock, [conn("a1", "10.0.0.5", p) for p in range(1, 31)])) == 1
    clock.advance(20)
    out = feed(eng, clock, [conn("a1", "10.0.0.6", p) for p in range(1, 31)])
    assert [o.record["window"]["count"] for o in out] == [30]


def test_plain_count_window(rs):
    clock = FakeClock()
    eng = Engine(rs, clock=clock)
    out = feed(eng, clock, [ex("a1") for _ in range(12)], step=0.1)
    assert len(out) == 1 and out[0].record["window"]["count"] == 5
    clock.advance(3)
    (s,) = eng.tick()
    assert s.record["window"]["count"] == 12 and s.record["rule"]["repeats"] == 7


def test_memory_is_bounded_and_evictions_counted(rs):
    clock = FakeClock()
    eng = Engine(rs, clock=clock, max_agents=3, max_keys=8)
    feed(eng, clock, [conn(f"a{i}", "10.0.0.5", 1) for i in range(10)], step=0)
    assert len(eng._windows) == 3 and eng.stats["window_agent_evictions"] == 7
    feed(eng, clock, [conn("z", "10.0.0.5", p) for p in range(1, 21)], step=0)
    assert len(eng._windows["z"]["scan"].keys) == 8
    assert eng.stats["window_key_evictions"] == 12


def test_swap_keeps_window_state_for_surviving_rules(rs, tmp_path):
    clock = FakeClock()
    eng = Engine(rs, clock=clock)
    assert feed(eng, clock, [conn("a1", "10.0.0.5", p) for p in range(1, 21)]) == []
    p = tmp_path / "new.yaml"
    p.write_text(SCAN.split("  - id: burst")[0])        # same scan rule, burst rule removed
    eng.swap_rules(load_rules([p]))
    out = feed(eng, clock, [conn("a1", "10.0.0.5", p) for p in range(21, 31)])
    assert [o.record["window"]["count"] for o in out] == [30]
    # a changed window definition starts from scratch
    p.write_text(SCAN.replace("count: 30", "count: 25").split("  - id: burst")[0])
    eng.swap_rules(load_rules([p]))
    assert eng._windows == {} or all("scan" not in s for s in eng._windows.values())


def test_a_looping_scanner_is_one_alert_and_summaries_of_growth(rs):
    clock = FakeClock()
    eng = Engine(rs, clock=clock)
    out = []
    # the same 40 ports over and over for 3 minutes, never quiet
    for _ in range(45):
        out += feed(eng, clock, [conn("a1", "10.0.0.5", p) for p in range(1, 41)], step=0.1)
        out += eng.tick()
    clock.advance(11)
    out += eng.tick()
    got = [(o.record["window"]["count"], o.record["rule"].get("repeats")) for o in out]
    assert got == [(30, None), (40, 10)]


def test_a_scan_that_keeps_growing_reports_progress(rs):
    clock = FakeClock()
    eng = Engine(rs, clock=clock)
    out = []
    for p in range(1, 1801):          # a new port every 0.1 s for 3 minutes
        out += eng.process(conn("a1", "10.0.0.5", p))
        clock.advance(0.1)
        if p % 10 == 0:
            out += eng.tick()
    clock.advance(11)
    out += eng.tick()
    counts = [o.record["window"]["count"] for o in out]
    assert counts[0] == 30 and counts[-1] == 1800 and len(out) == 4      # alert at 3 s, progress at 63 s and 123 s, end
    assert sum(o.record["rule"].get("repeats", 0) for o in out) == 1800 - 30
