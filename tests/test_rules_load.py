"""Rule files: typed validation with file:line:column errors, CEL checks, kernel lint, lists."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agenttrace.match.policy import compile_policy
from agenttrace.match.rules import RulesError, default_rule_paths, lint, load_rules

GOOD = """\
lists:
  ports: [3333, 4444]
rules:
  - id: pool-port
    description: connections to pool ports on external hosts
    category: mining
    severity: high
    on: [connect]
    match:
      dst: {scopes: [external], ports: ["$ports"]}
    action: block
    tags: [T1496]
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def rule(body: str, rid: str = "r1") -> str:
    head = f"""\
rules:
  - id: {rid}
    description: a rule written for a unit test
    category: exec
    severity: low
"""
    return head + textwrap.indent(textwrap.dedent(body), "    ")


def test_default_pack_lints_clean_and_documents_every_rule():
    assert lint(default_rule_paths()) == []
    rs = load_rules(default_rule_paths())
    assert len(rs.rules) >= 15
    for r in rs.rules:
        assert len(r.description) > 80, r.id          # why + how to tune
        assert r.tags, r.id
    for name in ("stratum_ports", "pool_domains", "miner_binaries", "tunnel_tools"):
        assert rs.lists[name], name
    assert "falcosecurity" in rs.list_sources["stratum_ports"]
    assert "falcosecurity" in rs.list_sources["pool_domains"]


def test_on_is_a_field_not_a_yaml11_boolean(tmp_path):
    rs = load_rules([write(tmp_path, "a.yaml", GOOD)])
    assert rs.rules[0].on == ("connect",)
    assert [r.id for r in rs.by_kind["connect"]] == ["pool-port"]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = write(tmp_path, "bad.yaml", "rules:\n  - id: x\n    on: [exec\n    action: report\n")
    errs = lint([f])
    assert len(errs) == 1
    assert errs[0].file == f and errs[0].line >= 3
    assert "YAML" in errs[0].message
    assert str(errs[0]).startswith(f"{f}:{errs[0].line}:")


def test_unknown_field_points_at_its_key(tmp_path):
    f = write(tmp_path, "u.yaml", rule("on: [exec]\nmatch: {exe: {basenames: [x]}}\nseverty: high\n"))
    (e,) = lint([f])
    assert (e.line, e.column) == (8, 5)
    assert e.field == "rules[0].severty" and e.rule_id == "r1"
    assert "unknown field 'severty'" in e.message


def test_unknown_field_inside_match(tmp_path):
    f = write(tmp_path, "u.yaml", rule("on: [exec]\nmatch:\n  exe: {basename: [x]}\n"))
    (e,) = lint([f])
    assert e.field == "rules[0].match.exe.basename" and e.line == 8
    assert "unknown field" in e.message


def test_bad_enum_and_missing_field(tmp_path):
    f = write(tmp_path, "e.yaml", """\
        rules:
          - id: r1
            description: a rule written for a unit test
            category: crypto
            severity: high
            on: [exec]
            match: {exe: {basenames: [x]}}
    """)
    f2 = write(tmp_path, "m.yaml", """\
        rules:
          - id: r2
            description: a rule written for a unit test
            severity: high
            on: [exec]
            match: {exe: {basenames: [x]}}
    """)
    errs = lint([f, f2])
    assert [(e.file, e.line, e.field) for e in errs] == [(f, 4, "rules[0].category"), (f2, 2, "rules[0].category")]
    assert "crypto" in errs[0].message and "missing" in errs[1].message


def test_cel_type_error_points_into_the_expression(tmp_path):
    f = write(tmp_path, "c.yaml", rule("on: [connect]\ncondition: 'net.dst.port == \"22\"'\n"))
    (e,) = lint([f])
    line = Path(f).read_text().splitlines()[e.line - 1]
    assert e.line == 7 and e.rule_id == "r1" and e.field == "rules[0].condition"
    assert line[e.column - 1:].startswith('== "22"')
    assert "no matching overload" in e.message


def test_cel_misspelt_field_and_block_scalar_position(tmp_path):
    f = write(tmp_path, "c.yaml", rule('on: [exec]\ncondition: |\n  proc.comm == "x" &&\n    proc.argz.size() > 0\n'))
    (e,) = lint([f])
    line = Path(f).read_text().splitlines()[e.line - 1]
    assert e.line == 9 and line[e.column - 1:].startswith(".argz")
    assert "argz" in e.message


def test_cel_syntax_error_and_section_missing_for_kind(tmp_path):
    f = write(tmp_path, "c.yaml", rule("on: [exec]\ncondition: 'proc.pid >'\n"))
    f2 = write(tmp_path, "d.yaml", rule("on: [exec]\ncondition: 'net.dst.port == 22'\n", rid="r2"))
    errs = lint([f, f2])
    assert len(errs) == 2
    assert "Syntax error" in errs[0].message and errs[0].line == 7
    assert "exec events do not carry" in errs[1].message and errs[1].rule_id == "r2"


def test_block_the_kernel_cannot_hold_is_an_error(tmp_path):
    f = write(tmp_path, "b.yaml", rule("""\
        on: [connect]
        match:
          dst: {names: ["*.pool.example"]}
        action: block
    """))
    f2 = write(tmp_path, "b2.yaml", rule("""\
        on: [exec]
        match: {exe: {basenames: [xmrig]}}
        condition: 'proc.uid == 0'
        action: block
    """, rid="r2"))
    errs = lint([f, f2])
    msgs = [(e.rule_id, e.field, e.message) for e in errs]
    assert any(r == "r1" and fld == "rules[0].match.dst.names" and "kernel cannot hold" in m for r, fld, m in msgs)
    assert any(r == "r2" and fld == "rules[0].condition" for r, fld, m in msgs)
    assert any(r == "r2" and "on" in fld for r, fld, m in msgs)
    assert all(e.line > 0 for e in errs)


def test_lint_returns_every_error_across_files(tmp_path):
    a = write(tmp_path, "a.yaml", GOOD)
    b = write(tmp_path, "b.yaml", GOOD.replace("lists:\n  ports: [3333, 4444]\n", "lists:\n  ports: [1]\n")
              + "  - id: second\n    description: refers to a list nobody defined\n    category: scan\n"
                "    severity: low\n    on: [connect]\n    match: {dst: {ports: [\"$nope\"]}}\n"
                "    tags: [not-an-id]\n")
    errs = lint([a, b])
    text = "\n".join(map(str, errs))
    assert "list 'ports' already defined" in text
    assert "duplicate rule id" in text
    assert "MITRE" in text
    assert len(errs) == 3, text       # tags error stops 'second' before the list check
    b2 = write(tmp_path, "c.yaml", rule("on: [connect]\nmatch: {dst: {ports: [\"$nope\", 70000]}}\n"))
    errs = lint([b2])
    assert {e.message.split(":")[0] for e in errs} == {"unknown list 'nope'", "not a port (1-65535) or range 'lo-hi'"}


def test_rules_error_carries_all_errors(tmp_path):
    f = write(tmp_path, "x.yaml", rule("on: [exec]\nbogus: 1\ncondition: 'kind + 1'\n"))
    with pytest.raises(RulesError) as ei:
        load_rules([f])
    assert len(ei.value.errors) == 1            # the model error stops this rule before CEL
    f2 = write(tmp_path, "y.yaml", rule("on: [exec]\ncondition: 'kind + 1'\n") +
               "  - id: r2\n    description: a second rule with its own problem\n    category: exec\n"
               "    severity: low\n    on: [exec]\n    bogus: 1\n    condition: 'true'\n")
    with pytest.raises(RulesError) as ei:
        load_rules([f2])
    assert {e.rule_id for e in ei.value.errors} == {"r1", "r2"}
    assert f2 in str(ei.value)


def test_empty_list_reference_never_matches_and_never_blocks_everything(tmp_path):
    f = write(tmp_path, "e.yaml", """\
        lists:
          nothing: []
        rules:
          - id: deny-listed
            description: block the listed networks, none listed yet
            category: egress
            severity: high
            on: [connect]
            match: {dst: {cidrs: ["$nothing"]}}
            action: block
    """)
    rs = load_rules([f])
    rec = {"kind": "connect", "net": {"dst": {"addr": "198.51.100.1", "port": 443, "scope": "external"}}}
    assert not rs.rules[0].match(rec)
    assert compile_policy(rs).dest_deny == []


def test_directories_expand_to_yaml_files(tmp_path):
    write(tmp_path, "a.yaml", GOOD)
    (tmp_path / "notes.txt").write_text("not a rule file")
    rs = load_rules([tmp_path])
    assert [r.id for r in rs.rules] == ["pool-port"]
    with pytest.raises(RulesError, match="cannot read"):
        load_rules([tmp_path / "missing.yaml"])


def test_message_placeholders_and_field_paths_are_checked(tmp_path):
    f = write(tmp_path, "m.yaml", rule("""\
        on: [exec]
        match: {exe: {basenames: [x]}}
        message: "{proc.exe} {prc.args} {window.count}"
        dedup: {fields: [proc.exe, nope.x]}
    """))
    errs = lint([f])
    assert sorted(e.field for e in errs) == ["rules[0].dedup.fields", "rules[0].message", "rules[0].message"]
    assert all(e.line > 0 for e in errs)


def test_union_fields_give_one_error_at_the_deepest_spot(tmp_path):
    f = write(tmp_path, "u.yaml", rule("""\
        on: [connect]
        match:
          dst: {scopes: [external], ports: [1.5]}
          unless:
            - dst: {cidrz: [10.0.0.0/8]}
    """))
    errs = lint([f])
    assert [(e.field, e.line) for e in errs] == [("rules[0].match.dst.ports[0]", 8),
                                                 ("rules[0].match.unless[0].dst.cidrz", 10)]
