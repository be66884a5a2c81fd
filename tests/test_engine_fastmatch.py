"""A match that tests only the command line runs as a specialised function in the engine
(match/engine.py cmdline_only): it must answer exactly as the compiled match does."""
import pytest

from agenttrace.match.engine import Engine, cmdline_only
from agenttrace.match.rules import load_rules
from agenttrace.session.event import Event

RECS = [
    {"proc": {"args": ["xmrig", "-o", "stratum+tcp://pool.example:3333"]}},
    {"proc": {"args": ["sh", "-c", "miner --url=STRATUM2+SSL://x"]}},
    {"proc": {"args": ["xmrig", "--donate-level=1"]}},
    {"proc": {"args": ["true"]}},
    {"proc": {"args": []}},
    {"proc": {"args": None}},
    {"proc": {}},
    {"proc": None},
    {},
    {"proc": {"args": ["a", "stratum+tcpx"]}},
]


def _pack():
    from agenttrace import session
    return session.load_ruleset(session.SessionOptions(cgroups=[]))


def test_specialised_cmdline_match_answers_as_the_compiled_match():
    rs = _pack()
    rules = [r for r in rs.rules if cmdline_only(r.match) is not None]
    assert "mining-stratum-args" in [r.id for r in rules]
    for r in rules:
        fast = cmdline_only(r.match)
        for rec in RECS:
            assert fast(rec) == r.match(rec), (r.id, rec)
        with pytest.raises(TypeError):       # argv that is not strings: an error either way
            r.match({"proc": {"args": [1]}})
        with pytest.raises(TypeError):
            fast({"proc": {"args": [1]}})


def test_a_match_with_any_other_criterion_is_not_specialised(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("""
rules:
  - id: both
    description: a rule for the fast-match test
    category: mining
    severity: high
    on: [exec]
    match:
      exe:
        basenames: [xmrig]
        cmdline_regex: ['stratum']
    action: report
  - id: only
    description: a rule for the fast-match test
    category: mining
    severity: high
    on: [exec]
    match:
      exe:
        cmdline_regex: ['stratum']
    action: report
""")
    rs = load_rules([f])
    by = {r.id: r for r in rs.rules}
    assert cmdline_only(by["both"].match) is None
    assert cmdline_only(by["only"].match) is not None
    eng = Engine(rs)
    ev = Event("exec", 1, {"kind": "exec", "ts": "2026-01-01T00:00:00.000000000Z", "agent": {"id": "a", "cgroup_id": 5},
                           "proc": {"pid": 7, "exe": "/usr/bin/python3", "comm": "python3",
                                    "args": ["python3", "-c", "x=1", "stratum+tcp://p:1"]}}, 7, 5)
    got = sorted(a.record["rule"]["id"] for a in eng.process(ev))
    assert got == ["only"]
