"""The daemon config's `egress.<group>.allow_file`: a long allow-list kept in a file of
`--allow-egress` specs, read as `run --allow-egress @FILE` reads one (no YAML node and no model
per entry), with errors naming the allow file's own line, and read again on every reload."""
from __future__ import annotations

import errno
import signal
import textwrap

import pytest

from agenttrace.config import ConfigError, load_config, parse_config
from conftest import AGENTTRACE
from harness import RULE, Daemon

# Destinations in benchmarking / documentation ranges, connected to from a fresh network
# namespace with no route: an allowed connect passes the hook and fails with ENETUNREACH, a
# blocked one is refused by the hook (EPERM); no packet is sent either way.
ALLOWED, UNLISTED = "198.18.0.1", "198.51.100.9"
PROBE = textwrap.dedent(f"""
    import ctypes, errno, socket, sys
    assert ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0   # CLONE_NEWNET
    out = []
    for addr in ({ALLOWED!r}, {UNLISTED!r}):
        s = socket.socket()
        out.append(s.connect_ex((addr, 443)))
        s.close()
    print(*out)
""")


def _allow_text(n_names: int, cidr: bool = True) -> str:
    lines = ["# generated: one spec per line, as for run --allow-egress @FILE"]
    lines += [f"n{i}.mirror.test:443" for i in range(n_names)]
    if cidr:
        lines.append("198.18.0.0/15:443   # the benchmark range")
    return "\n".join(lines) + "\n"


def test_inline_entries_come_first_then_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "allow.txt").write_text("\n# comment\npypi.org:443\n*.pythonhosted.org\n10.0.0.0/8:8000-8100\n")
    cfg = tmp_path / "agenttrace.yaml"
    cfg.write_text("egress:\n  web:\n    mode: allow-list\n    allow:\n      - {cidr: 10.0.0.2/32, ports: [53], proto: udp}\n"
                   "    allow_file: sub/allow.txt\n")
    pol = load_config(cfg).egress["web"]
    assert [(d.spec(), [str(p) for p in d.ports], d.proto) for d in pol.allow] == [
        ("10.0.0.2/32", ["53"], "udp"), ("pypi.org", ["443"], "any"), ("*.pythonhosted.org", [], "any"),
        ("10.0.0.0/8", ["8000-8100"], "any")]
    # absolute, so a reload from another working directory reads the same file
    assert pol.allow_file == str(tmp_path / "sub" / "allow.txt")
    # the rules and the kernel policy see the same entries as for inline ones
    from agenttrace.match.egress_policy import egress_rule_models
    rule = [r for r in egress_rule_models({"web": pol}) if r.id.endswith(".allow-list")][0]
    names = [n for u in rule.model_dump()["match"]["unless"] for n in (u.get("dst") or {}).get("names") or []]
    assert names == ["pypi.org", "*.pythonhosted.org"]


def test_errors_name_the_allow_file_line_and_field(tmp_path):
    allow = tmp_path / "allow.txt"
    allow.write_text("ok.example\nbad name\n# fine\nx.example:99999\n" + "also bad\n" * 30)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("egress:\n  default:\n    mode: allow-list\n    allow_file: allow.txt\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    issues = e.value.issues
    assert str(issues[0]).startswith(f"{allow}:2: egress.default.allow_file: entry 'bad name'")
    assert str(issues[1]).startswith(f"{allow}:4: egress.default.allow_file: entry 'x.example:99999'")
    # every bad line up to a bound, then how many more: a broken generated file does not
    # print 100,000 lines
    assert len(issues) == 21 and "and 12 more bad line(s)" in str(issues[-1])


def test_unreadable_file_and_open_mode_are_config_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config("egress:\n  default:\n    mode: allow-list\n    allow_file: nowhere.txt\n", "c.yaml", tmp_path)
    assert str(e.value) == f"c.yaml:4:17: egress.default.allow_file: cannot read {tmp_path}/nowhere.txt: No such file or directory"
    (tmp_path / "a.txt").write_text("pypi.org\n")
    with pytest.raises(ConfigError) as e:
        parse_config("egress:\n  default:\n    allow_file: a.txt\n", "c.yaml", tmp_path)
    assert "c.yaml:2:3: egress.default: allow_file needs mode: allow-list" in str(e.value)


def test_bad_allow_file_stops_the_daemon_with_exit_2(tmp_path, require_bpf):
    (tmp_path / "allow.txt").write_text("pypi.org:443\n10.0.0.0/33:443\n")
    cfg = tmp_path / "agenttrace.yaml"
    cfg.write_text("mode: enforce\nagents:\n  - cgroup: /agenttrace-none\n"
                   "egress:\n  default:\n    mode: allow-list\n    action: block\n    allow_file: allow.txt\n")
    import subprocess
    r = subprocess.run([AGENTTRACE, "daemon", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"{tmp_path}/allow.txt:2: egress.default.allow_file: entry '10.0.0.0/33:443': not a network" in r.stderr


def test_daemon_enforces_a_long_allow_file_and_rereads_it_on_reload(tmp_path, agent_tree):
    """`agenttrace daemon --config FILE` with 20,000 names and a CIDR in an allow file: the CIDR
    is allowed and an unlisted address blocked in the kernel; a reload after the CIDR's line is
    deleted blocks it; a reload with a bad line keeps the running policy and names the line."""
    allow = tmp_path / "allow.txt"
    allow.write_text(_allow_text(20_000))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=9))
    a = agent_tree.agent("a1")
    d = Daemon(tmp_path, agent_tree.root, rules, extra=textwrap.dedent("""
        egress:
          default:
            mode: allow-list
            scopes: [external]
            action: block
            allow_file: allow.txt
    """))

    def probe():
        r = agent_tree.run(a, ["python3", "-c", PROBE])
        assert r.returncode == 0, r.stderr
        return [int(x) for x in r.stdout.split()]

    try:
        d.start()
        assert d.wait_record(lambda r: r.get("phase") == "started")
        assert probe() == [errno.ENETUNREACH, errno.EPERM]
        alerts = d.wait_record(lambda r: r.get("kind") == "alert" and r["rule"]["id"] == "egress-policy.default.allow-list")
        assert alerts and alerts[0]["net"]["dst"]["addr"] == UNLISTED and alerts[0]["rule"]["outcome"] == "blocked"

        allow.write_text(_allow_text(20_000, cidr=False))
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_record(lambda r: r.get("phase") == "reloaded")
        assert probe() == [errno.EPERM, errno.EPERM]

        allow.write_text(_allow_text(10) + "not a name!\n")
        d.proc.send_signal(signal.SIGHUP)
        failed = d.wait_record(lambda r: r.get("phase") == "reload_failed")
        assert failed and f"{allow}:13: egress.default.allow_file" in failed[0]["error"], failed
        assert probe() == [errno.EPERM, errno.EPERM]
        assert d.stop() == 0
    finally:
        d.stop()
