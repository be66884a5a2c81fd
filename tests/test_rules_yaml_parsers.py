"""Rule files are parsed by libyaml (the start-up cost of the pure-Python parser, docs/STARTUP.md):
the same node tree, data, errors and file:line:column as the Python parser gave."""
from __future__ import annotations

import textwrap

import pytest
import yaml

from agenttrace.match import rules as R

pytestmark = pytest.mark.skipif(R._FastLoader is None, reason="PyYAML built without libyaml")

BAD = {
    # YAML syntax: libyaml refuses it, the Python parser words the error
    "syntax.yaml": "rules:\n  - id: x\n    on: [exec\n    action: report\n",
    "tab.yaml": "rules:\n\t- id: x\n",
    # schema errors placed by the node tree
    "unknown.yaml": """\
        rules:
          - id: r1
            description: a rule written for a unit test
            category: exec
            severity: low
            on: [exec]
            colour: red
        """,
    # CEL error inside a block scalar: its column comes from the file's text
    "cel.yaml": """\
        rules:
          - id: r1
            description: a rule written for a unit test
            category: exec
            severity: low
            on: [exec]
            condition: |
              proc.comm == "x" &&
                proc.argz.size() > 0
        """,
    "cel-inline.yaml": """\
        rules:
          - id: r1
            description: a rule written for a unit test
            category: exec
            severity: low
            on: [connect]
            condition: 'net.dst.port == "22"'
        """,
}


def _tree(node):
    """Everything of a node the loader uses: kind, tag, style, value and both marks."""
    if node is None:
        return None
    # a plain scalar's style is '' from libyaml, None from Python: the loader tests only for
    # the quoted and block styles
    head = (type(node).__name__, node.tag, getattr(node, "style", None) or None,
            node.start_mark.line, node.start_mark.column, node.end_mark.line, node.end_mark.column)
    if isinstance(node, yaml.ScalarNode):
        return head + (node.value,)
    if isinstance(node, yaml.SequenceNode):
        return head + (tuple(_tree(n) for n in node.value),)
    return head + (tuple((_tree(k), _tree(v)) for k, v in node.value),)


def _python_only(monkeypatch):
    monkeypatch.setattr(R, "_FastLoader", None)


def test_default_pack_same_tree_and_data_from_both_parsers():
    for f in R.default_rule_paths():
        text = open(f, encoding="utf-8").read()
        assert _tree(yaml.compose(text, Loader=R._FastLoader)) == _tree(yaml.compose(text, Loader=R._Loader)), f
        assert yaml.load(text, Loader=R._FastLoader) == yaml.load(text, Loader=R._Loader), f


def test_yaml_11_booleans_stay_strings_under_libyaml():
    data = yaml.load("on: [exec]\nx: yes\ny: true\n", Loader=R._FastLoader)
    assert data == {"on": ["exec"], "x": "yes", "y": True}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_fail_exactly_as_with_the_python_parser(tmp_path, monkeypatch, name):
    f = tmp_path / name
    f.write_text(textwrap.dedent(BAD[name]))
    fast = [str(e) for e in R.lint([str(f)])]
    _python_only(monkeypatch)
    slow = [str(e) for e in R.lint([str(f)])]
    assert fast and fast == slow


def test_default_pack_same_ruleset_from_both_parsers(monkeypatch):
    def shape(rs):
        return [(r.id, r.file, r.line, r.on, r.action, r.enforced_in, r.gate,
                 r.condition.source if r.condition else None) for r in rs.rules], rs.lists
    fast = shape(R.load_rules(R.default_rule_paths()))
    _python_only(monkeypatch)
    assert fast == shape(R.load_rules(R.default_rule_paths()))


def test_bad_rule_file_exits_2_through_the_cli(tmp_path):
    import subprocess
    from conftest import AGENTTRACE
    f = tmp_path / "cel.yaml"
    f.write_text(textwrap.dedent(BAD["cel.yaml"]))
    p = subprocess.run([AGENTTRACE, "rules", "lint", str(f)], capture_output=True, text=True)
    assert p.returncode == 2
    assert f"{f}:9:" in p.stderr and "argz" in p.stderr
