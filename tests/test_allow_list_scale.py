"""A large allow-list stays cheap to load and to match: entries that differ only in their name
become one match over a set (not one regex each), and every entry still decides exactly as it
did alone (the engine against records, no kernel needed)."""
from __future__ import annotations

import re

from agenttrace.kernel.egress import parse_allow_spec, run_policy
from agenttrace.match.egress_policy import egress_rule_models
from agenttrace.match.rules import _wild, load_rules


def _connect(name: str | None, addr: str, port: int, proto: str = "tcp") -> dict:
    dst = {"addr": addr, "port": port, "scope": "external", "name": name}
    return {"kind": "connect", "agent": {"group": "default"},
            "net": {"proto": proto, "family": "ipv4", "op": "connect", "dst": dst, "verdict": "allowed"}}


def test_allow_entries_sharing_ports_become_one_unless_match():
    pol = run_policy(["a.test:443", "b.test:443", "c.test:80", "d.test:443", "10.9.0.0/16:443"], "enforce")
    (rule,) = [r for r in egress_rule_models(pol) if r.id.endswith(".allow-list")]
    groups = [(u.dst.names, u.dst.cidrs, u.dst.ports) for u in rule.match.unless]
    assert groups == [(["a.test", "b.test", "d.test"], [], ["443"]), (["c.test"], [], ["80"]),
                      ([], ["10.9.0.0/16"], ["443"])]


def test_merged_allow_list_decides_each_connect_as_before():
    names = [f"n{i}.bench.test" for i in range(2000)]
    rs = load_rules([], run_policy([f"{n}:443" for n in names] + ["*.wild.test:443", "ok.test:80"], "enforce"))
    (rule,) = [r for r in rs.rules if r.id.endswith(".allow-list")]
    m = rule.match
    assert len(m.unless) == 2      # (names, 443) and (ok.test, 80): not 2,002 matches
    allowed = [_connect("n1999.bench.test", "203.0.113.9", 443), _connect("N7.Bench.Test.", "203.0.113.9", 443),
               _connect("x.wild.test", "203.0.113.9", 443), _connect("ok.test", "203.0.113.9", 80)]
    denied = [_connect("n1999.bench.test", "203.0.113.9", 80), _connect("n2000.bench.test", "203.0.113.9", 443),
              _connect("wild.test", "203.0.113.9", 443), _connect("ok.test", "203.0.113.9", 443),
              _connect(None, "203.0.113.9", 443), _connect("xn1.bench.test", "203.0.113.9", 443)]
    for rec in allowed:
        assert not m(rec), rec
    for rec in denied:
        assert m(rec), rec


def test_wild_matches_as_fnmatch_regexes_did():
    pats = ["xmrig", "*miner*", "ssh?", "[ab]c", "a.b", "Cap"]
    old = re.compile("|".join(f"(?:{__import__('fnmatch').translate(p)})" for p in pats), re.IGNORECASE)
    new = _wild(pats, icase=True)
    oldcs = re.compile("|".join(f"(?:{__import__('fnmatch').translate(p)})" for p in pats))
    newcs = _wild(pats)
    for s in ["xmrig", "XMRIG", "cpuminer-x", "sshd", "ssh", "ac", "bc", "cc", "a.b", "axb", "cap", "Cap",
              "xmrig2", "", "a.b\n"]:
        assert bool(new.match(s)) == bool(old.match(s)), s
        assert bool(newcs.match(s)) == bool(oldcs.match(s)), s
    assert _wild([]) is None


def test_name_specs_are_not_parsed_as_networks():
    assert parse_allow_spec("n1.bench.test:443").name == "n1.bench.test"
    assert parse_allow_spec("10.0.0.0/8:443").cidr == "10.0.0.0/8"
    assert parse_allow_spec("10.1.2.3").cidr == "10.1.2.3/32"
    assert parse_allow_spec("[2001:db8::/32]:443").cidr == "2001:db8::/32"


def test_spec_file_lines_comments_and_errors(tmp_path):
    from agenttrace.kernel.egress import SpecError
    f = tmp_path / "allow.txt"
    f.write_text("pypi.org:443\n# mirrors\n*.pythonhosted.org:443  # wheels\n\n10.0.0.0/8\n")
    pol = run_policy(["@" + str(f), "example.test:80"], "enforce")
    (p,) = pol.values()
    assert [a.spec() for a in p.allow] == ["pypi.org", "*.pythonhosted.org", "10.0.0.0/8", "example.test"]
    f.write_text("pypi.org\n\nbad..name\n")
    try:
        run_policy(["@" + str(f)], "enforce")
    except SpecError as e:
        assert str(e).startswith(f"{f}:3: --allow-egress 'bad..name'"), e
    else:
        raise AssertionError("a bad line was accepted")


def test_run_reads_allow_egress_from_a_file_through_the_cli(tmp_path):
    """`run --allow-egress @FILE -- CMD` as the README shows it: a bad line stops the start
    with exit 2 naming the file and line; a good file starts the egress probe."""
    import json
    import subprocess

    from conftest import AGENTTRACE
    f = tmp_path / "allow.txt"
    f.write_text("".join(f"n{i}.bench.test:443\n" for i in range(3000)) + "oops:99999\n")
    p = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", "--allow-egress", f"@{f}", "--", "true"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and f"{f}:3001: --allow-egress 'oops:99999'" in p.stderr, p.stderr[-2000:]
    f.write_text("".join(f"n{i}.bench.test:443\n" for i in range(3000)))
    out = tmp_path / "out.jsonl"
    p = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", "--allow-egress", f"@{f}", "-o", str(out),
                        "--", "true"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    started = next(json.loads(x) for x in out.read_text().splitlines() if '"started"' in x)
    assert "egress" in started["probes"], started
