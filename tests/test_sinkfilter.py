"""Per-sink filters: the matcher, the sink wrapper (refused records are counted, not dropped),
the config keys and their errors."""
from __future__ import annotations

import pytest

from agenttrace.config import ConfigError, parse_config
from agenttrace.sinks.filter import RecordFilter
from agenttrace.sinks.outputs import FilteredSink, build_sinks

from conftest import ListSink


def r(kind, agent="ep-1", sev=None, **labels):
    rec = {"kind": kind, "agent": {"id": agent, "cgroup": "/a", "cgroup_id": 1, **labels} if agent else None}
    if sev:
        rec["rule"] = {"id": "x", "severity": sev}
    return rec


def test_each_criterion_and_their_conjunction():
    ex, lo, hi, life = r("exec"), r("alert", sev="low"), r("alert", sev="critical"), r("lifecycle", agent=None)
    assert all(RecordFilter()(x) for x in (ex, lo, hi, life)) and RecordFilter().empty
    assert [RecordFilter(kinds=["alert"])(x) for x in (ex, lo, life)] == [False, True, False]
    # above info: alerts only, at or above the level
    assert [RecordFilter(min_severity="medium")(x) for x in (ex, lo, hi)] == [False, False, True]
    assert [RecordFilter(min_severity="info")(x) for x in (ex, lo)] == [True, True]
    assert [RecordFilter(agents=["ep-*"])(x) for x in (ex, r("exec", agent="other"), life)] == [True, False, False]
    assert RecordFilter(agents=["ep-1"])(ex) and not RecordFilter(agents=["ep-"])(ex)
    assert RecordFilter(labels={"team": "rl"})(r("exec", team="rl"))
    assert not RecordFilter(labels={"team": "rl"})(r("exec", team="infra"))
    assert RecordFilter(labels={"episode": "ep-4*"})(r("exec", episode="ep-42"))
    both = RecordFilter(kinds=["alert"], min_severity="high", agents=["ep-*"])
    assert [both(x) for x in (ex, lo, hi, r("alert", agent="z", sev="critical"))] == [False, False, True, False]
    with pytest.raises(ValueError):
        RecordFilter(min_severity="severe")


def test_filtered_sink_counts_what_it_refuses_apart_from_drops():
    inner = ListSink()
    s = FilteredSink(inner, RecordFilter(kinds=["alert"]))
    s.emit_batch([r("exec"), r("alert", sev="low"), r("exec")])
    s.emit(r("exec"))
    assert [x["kind"] for x in inner.records] == ["alert"]
    assert s.filtered == 3 and s.dropped == 0 and s.stats()["filter"] == {"kinds": ["alert"]}


def test_filters_from_the_config(tmp_path):
    cfg = parse_config(f"""
sinks:
  stdout: {{filter: {{kinds: [alert]}}}}
  socket: null
  file:
    path: {tmp_path}/e.jsonl
    filter: {{min_severity: high, agents: ["ep-*"], labels: {{team: rl}}}}
  syslog:
    address: tcp://127.0.0.1:6514
    filter: {{kinds: [alert, summary]}}
""")
    fan = build_sinks(cfg.sinks)
    try:
        assert all(isinstance(s, FilteredSink) for s in fan.sinks) and len(fan.sinks) == 3
        assert fan.sinks[1].accept.describe() == {"min_severity": "high", "agents": ["ep-*"], "labels": {"team": "rl"}}
    finally:
        fan.close()
    assert build_sinks(parse_config("sinks: {stdout: true, socket: null}").sinks).sinks[0].__class__.__name__ == "QueuedSink"


@pytest.mark.parametrize("text,where", [
    ("sinks:\n  file:\n    path: /tmp/x\n    filter: {kinds: [execs]}\n", "sinks.file.filter.kinds"),
    ("sinks:\n  syslog:\n    filter: {min_severity: severe}\n", "sinks.syslog.filter.min_severity"),
    ("sinks:\n  stdout: {filter: {agents: []}}\n", "sinks.stdout"),
    ("sinks:\n  stdout: {filter: {kind: [exec]}}\n", "sinks.stdout"),
])
def test_bad_filters_name_file_line_and_field(text, where):
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "agenttrace.yaml")
    msg = str(ei.value)
    assert "agenttrace.yaml:" in msg and where in msg, msg


def test_socket_subscription_uses_the_same_matcher_with_its_own_severity_contract():
    """A socket subscription's min_severity ranks alerts and leaves other kinds alone (its
    documented contract), where a sink filter counts other kinds as info; agents and labels
    match the same way in both, patterns included."""
    from agenttrace.sinks.subscription import Subscription, SubscriptionError
    ex, lo, hi, life = r("exec"), r("alert", sev="low"), r("alert", sev="high"), {"kind": "lifecycle"}
    sub = Subscription.from_dict({"min_severity": "medium"})
    assert [sub.matches(x) for x in (ex, lo, hi, life)] == [True, False, True, True]
    assert [RecordFilter(min_severity="medium")(x) for x in (ex, lo, hi, life)] == [False, False, True, False]
    sub = Subscription.from_dict({"agents": ["ep-*"], "labels": {"team": "r*"}})
    assert sub.matches(r("exec", team="rl")) and not sub.matches(r("exec", team="infra"))
    assert not sub.matches(r("exec", agent="other", team="rl")) and not sub.matches(life)
    assert Subscription.from_dict({"kinds": ["alert"]}).matches(hi)
    with pytest.raises(SubscriptionError):
        Subscription.from_dict({"min_severity": "urgent"})
