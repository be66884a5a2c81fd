"""`agenttrace tail` lines: readable, highlighted, and impossible for an agent to use against
the operator's terminal."""
from __future__ import annotations

import re

import pytest

from agenttrace.sinks.tailview import Filter, escape, render

TS = "2026-11-27T07:00:01.234567891Z"
AGENT = {"id": "a1", "cgroup": "/agents/a1", "cgroup_id": 7}
PROC = {"pid": 4321, "ppid": 1, "uid": 0, "comm": "python3", "exe": "/usr/bin/ssh",
        "args": ["ssh", "-R", "2222:localhost:22", "u@203.0.113.7"], "ancestry": []}
ANSI_FROM_US = re.compile(r"\x1b\[[0-9;]*m")


def rec(kind, **body):
    r = {"ts": TS, "kind": kind, "node": "n", "agent": dict(AGENT)}
    r.update(body)
    return r


def no_raw_controls(line: str) -> None:
    """Nothing but our own SGR colour codes may carry an ESC; no other control character at all."""
    stripped = ANSI_FROM_US.sub("", line)
    for ch in stripped:
        o = ord(ch)
        assert not (o < 0x20 or 0x7f <= o <= 0x9f), f"raw control {o:#x} in {line!r}"
        assert ch not in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\u2028\u2029"


def test_malicious_argv_cannot_touch_the_terminal():
    evil = ["sh", "-c", "\x1b]0;title\x07", "\x1b[2J", "ok\rFAKE LINE", "back\x08\x08", "\x9b31m",
            "\u202egnp.exe", "\x00nul", "zero\u200bwidth", "\x7f"]
    p = dict(PROC, args=evil, comm="\x1b[1mcomm", exe="/tmp/\x1b[Kx")
    for color in (True, False):
        line = render(rec("exec", proc=p), color=color)
        no_raw_controls(line)
        assert "\n" not in line
        assert "\\x1b]0;title\\x07" in line
        assert "\\x1b[2J" in line
        assert "ok\\rFAKE" in line and "back\\x08\\x08" in line
        assert "\\x9b31m" in line and "\\u202egnp.exe" in line and "\\x00nul" in line
        assert "zero\\u200bwidth" in line and "\\x7f" in line
        assert "\\x1b[1mcomm" in line and "/tmp/\\x1b[Kx" in line
    assert "\x1b" not in render(rec("exec", proc=p), color=False)


@pytest.mark.parametrize("kind,body", [
    ("dns", {"proc": PROC, "dns": {"query": "\x1b[2Jevil.example", "qtype": "A",
                                   "server": {"addr": "10.0.0.53", "port": 53}, "answers": ["\x1b]8;;x\x07"]}}),
    ("flow", {"proc": PROC, "net": {"proto": "tcp", "dst": {"addr": "203.0.113.7", "port": 22}},
              "flow": {"protocol": "ssh", "detail": {"banner": "SSH-2.0-\x1b[31mred\r\n"}}}),
    ("alert", {"proc": PROC, "rule": {"id": "x", "severity": "high", "outcome": "reported",
                                      "message": "m\x1b[2J"}}),
    ("connect", {"proc": PROC, "net": {"proto": "tcp", "dst": {"addr": "203.0.113.7", "port": 22,
                                                                 "name": "\u202eevil", "scope": "external"}}}),
    ("lifecycle", {"phase": "stats\x1b[2J", "counters": {"events\x07": 1}}),
])
def test_every_agent_supplied_field_is_escaped(kind, body):
    r = rec(kind, **body)
    r["agent"]["id"] = "a\x1b[2J1"
    r["agent"]["team"] = "\x1b]0;t\x07"
    line = render(r)
    no_raw_controls(line)
    assert "a\\x1b[2J1" in line


def test_exec_line_shows_time_agent_pid_comm_and_command():
    line = render(rec("exec", proc=PROC), color=False)
    assert line.startswith("07:00:01.234 a1")
    assert "exec" in line and "4321/python3" in line
    assert "/usr/bin/ssh  ssh -R 2222:localhost:22 u@203.0.113.7" in line
    arg_with_space = render(rec("exec", proc=dict(PROC, args=["echo", "a b", ""])), color=False)
    assert "echo 'a b' ''" in arg_with_space


def test_connect_line_shows_destination_scope_result_and_block():
    net = {"proto": "tcp", "family": "ipv4", "src": {"addr": "10.0.0.5", "port": 4000},
           "dst": {"addr": "203.0.113.7", "port": 22, "scope": "external", "name": "evil.example"},
           "verdict": "blocked", "result": "blocked"}
    line = render(rec("connect", proc=PROC, net=net), color=False)
    assert "tcp → 203.0.113.7:22 (evil.example) external blocked BLOCKED" in line
    v6 = render(rec("connect", proc=PROC, net=dict(net, dst={"addr": "2001:db8::1", "port": 443})), color=False)
    assert "[2001:db8::1]:443" in v6


def test_alert_line_is_highlighted_with_rule_severity_outcome():
    r = rec("alert", proc=PROC, rule={"id": "tunnel.reverse_ssh", "category": "tunnel", "severity": "critical",
                                      "action": "kill", "outcome": "killed", "tags": ["T1572"],
                                      "message": "reverse SSH tunnel"})
    plain = render(r, color=False)
    assert "ALERT CRITICAL tunnel.reverse_ssh killed — reverse SSH tunnel" in plain
    assert "[/usr/bin/ssh  ssh -R" in plain
    coloured = render(r, color=True)
    assert "\x1b[1;97;41mALERT CRITICAL tunnel.reverse_ssh\x1b[0m" in coloured
    assert ANSI_FROM_US.sub("", coloured) == plain


def test_other_kinds_render_their_gist():
    assert "exit 3 after 12 ms" in render(rec("exit", proc=PROC, exit_code=3, duration_ms=12), color=False)
    assert "tcp listen 0.0.0.0:8080" in render(
        rec("listen", proc=PROC, net={"proto": "tcp", "local": {"addr": "0.0.0.0", "port": 8080}}), color=False)
    assert "A pool.example @ 10.0.0.53:53 → 198.51.100.9" in render(
        rec("dns", proc=PROC, dns={"query": "pool.example", "qtype": "A", "server": {"addr": "10.0.0.53", "port": 53},
                                   "answers": ["198.51.100.9"]}), color=False)
    assert "gpu0 H100 mem 1024MiB sm 97%" in render(
        rec("gpu", proc=PROC, gpu={"index": 0, "name": "H100", "used_memory_mib": 1024, "sm_util_pct": 97}),
        color=False)
    assert "dev 195:0 rw BLOCKED" in render(
        rec("device", proc=PROC, device={"major": 195, "minor": 0, "access": "rw", "verdict": "blocked"}), color=False)
    assert "started" in render({"ts": TS, "kind": "lifecycle", "node": "n", "phase": "started"}, color=False)
    # A record from a newer version with an unknown kind still renders, escaped.
    assert "x=\\x1b" in render(rec("future", x="\x1b"), color=False)
    # Broken records do not raise.
    render({"kind": "connect", "net": "not a dict", "proc": None})


def test_escape_passes_ordinary_text_untouched():
    for s in ("plain", "ünïcödé 中文 emoji 🙂", "a b c", "/usr/bin/python3.11"):
        assert escape(s) == s
    assert escape("a\\b") == "a\\\\b"  # so an escape in the output is never ambiguous
    assert escape(5) == "5"


def test_filter():
    exec_a1 = rec("exec", proc=PROC)
    exec_b2 = dict(rec("exec", proc=PROC), agent={"id": "b2"})
    low = rec("alert", rule={"id": "r", "severity": "low"})
    crit = rec("alert", rule={"id": "r", "severity": "critical"})
    life = {"ts": TS, "kind": "lifecycle", "phase": "stats"}
    assert all(Filter()(r) for r in (exec_a1, exec_b2, low, crit, life))
    f = Filter(agents=["a*"])
    assert f(exec_a1) and not f(exec_b2) and not f(life)
    assert [Filter(kinds=["exec"])(r) for r in (exec_a1, low)] == [True, False]
    assert [Filter(alerts_only=True)(r) for r in (exec_a1, low, crit)] == [False, True, True]
    assert [Filter(min_severity="high")(r) for r in (exec_a1, low, crit)] == [False, False, True]
    assert [Filter(min_severity="info")(r) for r in (exec_a1, low)] == [True, True]
    with pytest.raises(ValueError):
        Filter(min_severity="severe")


def test_lifecycle_stats_show_nested_counters():
    line = render({"ts": TS, "kind": "lifecycle", "node": "n", "agent": None, "phase": "stats", "events": 10,
                   "drops": {"kernel": 3, "kernel_by_agent": {"a\x1b1": 3}, "sinks": {"stdout": 0}}}, color=False)
    assert "stats events=10 drops.kernel=3 drops.kernel_by_agent.a\\x1b1=3 drops.sinks.stdout=0" in line
