"""What makes loading many rules cheaper (issue #15, "how cost grows") keeps its meaning: the data
built from libyaml's one tree equals PyYAML's `load`, wildcards compiled on first use match as
when compiled at load, compiled CEL conditions are shared by their text yet every rule still
alerts on its own, a changed condition recompiles, and the collector runs again after a load."""
from __future__ import annotations

import fnmatch
import gc
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from agenttrace.match import rules as R
from agenttrace.match.engine import Engine
from agenttrace.session.event import Event

REPO = Path(__file__).resolve().parent.parent

TRICKY = [
    "a: 1\nb: 0x1F\nc: 1.5e3\nd: .inf\ne: null\nf: ~\ng: true\nh: on\ni: 'on'\nj: 2026-12-02\nk: [1, x, {y: z}]\n",
    "base: &b {x: 1, y: [a, b]}\nuse: *b\nlist: [*b, *b]\n",
    "base: &b {x: 1}\nmerged:\n  <<: *b\n  y: 2\n",
    "1: int key\n2.5: float key\n",
    "1: int key\n? [a, b]\n: seq key\n",
    "s: !!str 12\nt: !!int '7'\nbin: !!binary aGVsbG8=\n",
    "empty:\nblock: |\n  two\n  lines\nfolded: >\n  one\n  line\n",
    "",
    "# only a comment\n",
    "- a\n- b: c\n",
]


@pytest.mark.skipif(R._FastLoader is None, reason="PyYAML built without libyaml")
def test_data_built_from_the_tree_equals_pyyaml_load(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.growth import write_rules
    texts = [f.read_text() for f in sorted((REPO / "rules").glob("*.yaml"))]
    texts.append(write_rules(tmp_path / "gen.yaml", 60).read_text())
    for text in texts + TRICKY:
        try:
            want = yaml.load(text, Loader=R._Loader)
        except yaml.YAMLError:
            with pytest.raises(yaml.YAMLError):
                R._compose_and_load(text)
            continue
        node, data = R._compose_and_load(text)
        assert data == want, text[:200]
        assert data == yaml.load(text, Loader=R._FastLoader), text[:200]
        assert (node is None) == (yaml.compose(text, Loader=R._Loader) is None)
    # a merge key keeps the tree libyaml composed (PyYAML's constructor rewrites merged
    # mappings in place): the node of `merged` still holds its `<<` key
    node, _ = R._compose_and_load(TRICKY[2])
    merged = [v for k, v in node.value if k.value == "merged"][0]
    assert [k.value for k, _ in merged.value] == ["<<", "y"]


def test_wildcards_compiled_on_first_use_match_as_at_load():
    pats = ["/opt/tools/*", "*miner*", "ssh?", "[ab]c", "exact", "Cap.x"]
    for icase in (False, True):
        w = R._wild(pats, icase=icase)
        assert w._rx is None, "compiled before any match"
        old = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats), re.IGNORECASE if icase else 0)
        for s in ["/opt/tools/x", "/opt/tool", "cpuminer", "sshd", "ssh", "ac", "cc", "exact", "EXACT", "cap.x",
                  "Cap.x", "capxx", ""]:
            assert w.match(s) == bool(old.match(s)), (icase, s)
        assert w._rx is not None
    lit = R._wild(["a", "b"])
    assert lit.match("a") and not lit.match("c") and lit.rx is None


def _rules(tmp_path, cond_a: str, cond_b: str) -> Path:
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""\
        rules:
          - id: a
            description: first rule of two sharing a condition
            category: exec
            severity: low
            on: [exec]
            condition: '{cond_a}'
          - id: b
            description: second rule of two sharing a condition
            category: exec
            severity: high
            on: [exec]
            match: {{exe: {{basenames: [curl]}}}}
            condition: '{cond_b}'
        """))
    return f


def _exec(comm: str, args: list) -> dict:
    return {"kind": "exec", "ts": "2026-12-02T00:00:00Z", "node": "n", "agent": {"id": "a1", "group": "default"},
            "proc": {"pid": 10, "ppid": 1, "comm": comm, "exe": f"/usr/bin/{comm}", "argv": [comm] + args,
                     "args": args, "cmdline": " ".join([comm] + args)}}


def _fired(rs, rec) -> list:
    return sorted(al.record["rule"]["id"] for al in Engine(rs).process(Event("exec", 10, dict(rec), 5, 7)))


def test_rules_with_one_condition_share_its_program_and_alert_on_their_own(tmp_path):
    cond = "proc.args.exists(a, a.startsWith(\"--upload\"))"
    R._CEL_CACHE.clear()
    rs = R.load_rules([_rules(tmp_path, cond, cond)])
    a, b = rs.get("a"), rs.get("b")
    assert a.condition.program is b.condition.program
    assert list(R._CEL_CACHE) == [cond]
    assert _fired(rs, _exec("wget", ["--upload-file", "x"])) == ["a"]
    assert _fired(rs, _exec("curl", ["--upload-file", "x"])) == ["a", "b"]
    assert _fired(rs, _exec("curl", ["-O", "x"])) == []
    # a reload of the same files compiles nothing; a changed condition compiles anew
    again = R.load_rules([_rules(tmp_path, cond, cond)])
    assert again.get("a").condition.program is a.condition.program
    changed = cond.replace("--upload", "--data")
    rs2 = R.load_rules([_rules(tmp_path, cond, changed)])
    assert rs2.get("b").condition.program is not a.condition.program
    assert rs2.get("a").condition.program is a.condition.program
    assert _fired(rs2, _exec("curl", ["--upload-file", "x"])) == ["a"]
    assert _fired(rs2, _exec("curl", ["--data-binary", "x"])) == ["b"]


def test_a_bad_condition_is_an_error_at_every_load(tmp_path):
    R._CEL_CACHE.clear()
    for _ in range(2):
        with pytest.raises(R.RulesError) as e:
            R.load_rules([_rules(tmp_path, "proc.comm == ", "proc.comm == \"x\"")])
        assert any(x.rule_id == "a" and "CEL" in x.message for x in e.value.errors), e.value.errors
        with pytest.raises(R.RulesError, match="must be a bool"):
            R.load_rules([_rules(tmp_path, "proc.comm", "proc.comm == \"x\"")])
    assert "proc.comm == " not in R._CEL_CACHE


def test_collection_resumes_after_a_load_good_or_bad(tmp_path):
    assert gc.isenabled()
    R.load_rules([REPO / "rules"])
    assert gc.isenabled()
    with pytest.raises(R.RulesError):
        R.load_rules([_rules(tmp_path, "proc.comm == ", "true")])
    assert gc.isenabled()
    gc.disable()
    try:
        R.load_rules([REPO / "rules"])
        assert not gc.isenabled(), "a caller's own pause is kept"
    finally:
        gc.enable()


def test_rules_lint_of_the_generated_pack_through_the_cli(tmp_path):
    from conftest import AGENTTRACE
    sys.path.insert(0, str(REPO))
    from bench.growth import write_rules
    f = write_rules(tmp_path / "gen.yaml", 90)
    p = subprocess.run([AGENTTRACE, "rules", "lint", str(REPO / "rules"), str(f)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    f.write_text(f.read_text().replace("cmdline_regex: ['--bench-flag-1\\b']", "cmdline_regex: ['(a']"))
    p = subprocess.run([AGENTTRACE, "rules", "lint", str(f)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and f"{f}:" in p.stdout + p.stderr, p.stdout + p.stderr
