"""Listen (and other unindexed kinds') rules by the values their conditions first compare
(match/eqindex.py): the engine fires exactly what it fires without the index, rule for rule,
counts the same CEL errors, and an accept of a TCP storm meets no candidate."""
import random
import textwrap

from agenttrace.match.celgate import eq_field
from agenttrace.match.engine import Engine
from agenttrace.match.rules import default_rule_paths, load_rules
from agenttrace.session.event import Event

RULES = "rules:\n" + textwrap.indent(textwrap.dedent("""\
    - id: t-evil-accept
      description: an accept by a program of a given name (the comm is the agent's to choose)
      category: tunnel
      severity: low
      on: [listen]
      condition: proc.comm == "evil" && net.what == "accept"
      action: report
    - id: t-port-listen
      description: a listen on a given port, with a match (never dropped by the index)
      category: tunnel
      severity: low
      on: [listen]
      match: {exe: {basenames: [srv]}}
      condition: net.what == "listen" && net.local.port == 9999
      action: report
    - id: t-either
      description: a top-level or (no first conjunct decides it)
      category: tunnel
      severity: low
      on: [listen]
      condition: net.what == "nothing" || net.local.port == 7
      action: report
    """), "  ")


def _listen(what, addr, port, comm="storm", exe="/usr/bin/storm"):
    net = {"proto": "tcp", "family": "ipv4", "local": {"addr": addr, "port": port}}
    if what is not _NO:
        net["what"] = what
    if what == "accept":
        net["remote"] = {"addr": "127.0.0.1", "port": 40000, "scope": "loopback"}
    return {"ts": "2026-01-01T00:00:00.000000000Z", "kind": "listen", "node": "n",
            "agent": {"id": "a", "cgroup": "/a", "cgroup_id": 7},
            "proc": {"pid": 5, "ppid": 1, "uid": 0, "comm": comm, "exe": exe, "args": [comm],
                     "exec_id": "x", "parent_exec_id": None, "ancestry": []}, "net": net}


_NO = object()


def test_eq_field_reads_only_an_equality_first_conjunct():
    assert eq_field('net.what == "listen" && x') == (("net", "what"), "listen")
    assert eq_field("proc.comm == 'a'") == (("proc", "comm"), "a")
    assert eq_field('net.what != "listen" && x') is None
    assert eq_field('net.what == "listen" || x') is None
    assert eq_field('lists.a == "b" && x') is None
    assert eq_field('has(proc.ssh) && x') is None


def test_eq_index_fires_what_the_unindexed_engine_fires(tmp_path):
    f = tmp_path / "listen.yaml"
    f.write_text(RULES)
    rs = load_rules(default_rule_paths() + [str(f)])
    fast, slow = Engine(rs), Engine(rs)
    slow._eq_ix = {}
    ix = fast._eq_ix["listen"]
    # the pack's rule and the comm one; not the one with a match, not the top-level or
    assert set(ix.need) == {"tunnel-listen-external", "t-evil-accept"}
    rnd = random.Random(15)
    whats = ["listen", "accept", _NO, 5, None, "LISTEN"]
    for n in range(800):
        rec = _listen(rnd.choice(whats), rnd.choice(["0.0.0.0", "127.0.0.1", "::", "::1", 3]),
                      rnd.choice([9999, 7, 80]),
                      comm=rnd.choice(["evil", "storm", f"c{n}", None]), exe=rnd.choice(["/x/srv", "/x/a"]))
        a = [al.record["rule"]["id"] for al in fast.process(Event("listen", n, dict(rec), 5, 7))]
        b = [al.record["rule"]["id"] for al in slow.process(Event("listen", n, dict(rec), 5, 7))]
        assert a == b, rec
    assert fast.stats["matched"] == slow.stats["matched"]
    assert fast.stats["cel_errors"] == slow.stats["cel_errors"] > 0
    for rid in ("tunnel-listen-external", "t-evil-accept", "t-port-listen", "t-either"):
        assert fast.stats["matched"][rid] > 0, rid
    assert len(ix._kept) <= 4096


def test_a_storm_accept_meets_no_candidate():
    rs = load_rules(default_rule_paths())
    eng = Engine(rs)
    calls = []
    cel = eng._cel
    eng._cel = lambda rule, rec: calls.append(rule.id) or cel(rule, rec)
    for n in range(50):
        assert eng.process(Event("listen", n, _listen("accept", "127.0.0.1", 43077), 5, 7)) == []
    assert calls == []
    # a listen on every address still meets the pack's rule, and fires it
    out = eng.process(Event("listen", 99, _listen("listen", "0.0.0.0", 8080), 5, 7))
    assert [al.record["rule"]["id"] for al in out] == ["tunnel-listen-external"] and calls


def test_fields_outside_net_and_proc_are_not_indexed(tmp_path):
    """A record holding the previous record's very net and proc meets its candidates (the
    engine's shortcut): a rule comparing another part first must stay a candidate, or an
    accept by a second agent through the same parts would be skipped."""
    f = tmp_path / "agent.yaml"
    f.write_text("rules:\n" + textwrap.indent(textwrap.dedent("""\
        - id: t-agent-b
          description: accepts of one agent
          category: tunnel
          severity: low
          on: [listen]
          condition: agent.id == "b" && net.what == "accept"
          action: report
        """), "  "))
    eng = Engine(load_rules([str(f)]))
    first = _listen("accept", "127.0.0.1", 80)
    second = dict(first, agent={"id": "b", "cgroup": "/b", "cgroup_id": 8})
    assert eng.process(Event("listen", 1, first, 5, 7)) == []
    out = eng.process(Event("listen", 2, second, 5, 8))
    assert [al.record["rule"]["id"] for al in out] == ["t-agent-b"]
