"""Exec rules whose exe paths are wildcards are met only by execs under the paths' literal
prefixes (`/opt/tools/*` -> `/opt/tools/`), and fire exactly as when every rule is evaluated:
the growth bench's 500 generated rules made every exec walk 166 such rules."""
from __future__ import annotations

from agenttrace.match.engine import Engine
from agenttrace.match.rules import default_rule_paths, load_rules
from agenttrace.session.event import Event

RULES = """rules:
  - id: opt-tools
    description: a test rule of the exe-prefix index
    severity: low
    category: exec
    on: [exec]
    action: report
    match:
      exe:
        paths: ['/opt/tools/*', '/srv/bin/x?']
        cmdline_regex: ['--go\\b']
  - id: any-miner
    description: a test rule of the exe-prefix index
    severity: low
    category: exec
    on: [exec]
    action: report
    match:
      exe: {paths: ['*/xmrig*']}
  - id: exact
    description: a test rule of the exe-prefix index
    severity: low
    category: exec
    on: [exec]
    action: report
    match:
      exe: {paths: ['/usr/bin/true']}
"""


def _exec(exe, args):
    return {"ts": "2026-01-01T00:00:00.000000000Z", "node": "n", "kind": "exec",
            "agent": {"id": "a", "cgroup": "/a", "cgroup_id": 7},
            "proc": {"pid": 5, "ppid": 1, "uid": 0, "comm": exe.rsplit("/", 1)[-1][:15], "exe": exe,
                     "args": args, "exec_id": "x", "parent_exec_id": None, "ancestry": []}}


def test_prefixes_come_from_the_wildcard_paths(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(RULES)
    by_id = {r.id: r for r in load_rules([f]).rules}
    assert by_id["opt-tools"].exe_prefixes == ("/opt/tools/", "/srv/bin/x")
    assert by_id["any-miner"].exe_prefixes is None       # a leading wildcard can match anything
    assert by_id["exact"].exe_prefixes is None and by_id["exact"].gate == {"true"}


def test_prefix_candidates_fire_what_evaluating_every_rule_fires(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(RULES)
    rs = load_rules(default_rule_paths() + [f])
    fast = Engine(rs)
    # the reference: the same rules with no prefix keys (copies, so `fast` keeps its own)
    import dataclasses
    rs_slow = dataclasses.replace(rs, rules=[dataclasses.replace(r, exe_prefixes=None) for r in rs.rules],
                                  by_kind={})
    slow = Engine(rs_slow)
    cases = [("/opt/tools/run", ["run", "--go"]), ("/opt/tools/run", ["run"]), ("/opt/toolsx/run", ["run", "--go"]),
             ("/srv/bin/xy", ["xy", "--go"]), ("/srv/bin/xyz", ["xyz", "--go"]), ("/usr/bin/true", ["true"]),
             ("/home/u/xmrig-6", ["xmrig-6"]), ("/tmp/x", ["x", "--go"]), ("", ["--go"])]
    fired = []
    for exe, args in cases * 2:          # twice: the second pass comes from the candidate cache
        a = sorted(al.record["rule"]["id"] for al in fast.process(Event("exec", 1, _exec(exe, args), 5, 7)))
        b = sorted(al.record["rule"]["id"] for al in slow.process(Event("exec", 1, _exec(exe, args), 5, 7)))
        assert a == b, (exe, args)
        fired += a
    m = fast.stats["matched"]           # matches, before alert de-duplication
    assert m == slow.stats["matched"]
    assert m["opt-tools"] == 2 * 2 and m["any-miner"] == 2 and m["exact"] == 2, m
    assert "opt-tools" in fired
    # and the rule was not even a candidate where its prefixes cannot match
    cands = {k[4]: {r.id for r in v[1]} for k, v in fast._gate_cache.items() if k[0] == "exec"}
    assert "opt-tools" not in cands["/tmp/x"] and "opt-tools" in cands["/opt/tools/run"]
    assert "opt-tools" not in cands["/opt/toolsx/run"] and "any-miner" in cands["/tmp/x"]
