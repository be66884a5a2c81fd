"""The daemon refuses a config, rule file or allow file that a user other than root could change
(tracer/ops/filetrust.py): an agent running as an ordinary user that can write its own policy
would widen it at the next reload. Checked through `agenttrace daemon --config` (exit 2, nothing
started) and through a SIGHUP reload (the running policy stays)."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from agenttrace.ops.filetrust import untrusted_reason
from conftest import AGENTTRACE
from harness import RULE, Daemon

NOBODY = 65534


def test_what_counts_as_changeable_by_others(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mode: monitor\n")
    f.chmod(0o644)
    assert untrusted_reason(str(f)) is None
    f.chmod(0o666)
    assert untrusted_reason(str(f)) == f"{f} is writable by every user (mode 0666)"
    f.chmod(0o664)
    assert untrusted_reason(str(f)) is None          # root's own group
    os.chown(f, 0, NOBODY)
    assert untrusted_reason(str(f)) == f"{f} is writable by group {NOBODY} (mode 0664)"
    os.chown(f, NOBODY, 0)
    f.chmod(0o644)
    assert untrusted_reason(str(f)) == f"{f} is owned by uid {NOBODY}, not root"
    os.chown(f, 0, 0)
    # a folder on the way: whoever may write it may replace the file
    tmp_path.chmod(0o777)
    try:
        assert untrusted_reason(str(f)) == f"{tmp_path} is writable by every user (mode 0777)"
        # sticky (as /tmp): only an entry's owner may replace it, and that owner is root
        tmp_path.chmod(0o1777)
        assert untrusted_reason(str(f)) is None
        # ...but a link there owned by someone else may be re-pointed by them
        link = tmp_path / "link.yaml"
        link.symlink_to(f)
        assert untrusted_reason(str(link)) is None
        os.lchown(link, NOBODY, NOBODY)
        assert untrusted_reason(str(link)) == f"{link} is owned by uid {NOBODY}, not root"
    finally:
        tmp_path.chmod(0o700)
    # every link on the way is followed: a root-owned link to a link in a writable folder
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (open_dir / "inner").symlink_to(f)
    outer = tmp_path / "outer.yaml"
    outer.symlink_to(open_dir / "inner")
    assert untrusted_reason(str(outer)) == f"{open_dir} is writable by every user (mode 0777)"
    # relative paths and ".." are resolved as the kernel resolves them
    assert untrusted_reason(os.path.relpath(f)) is None
    assert untrusted_reason(str(open_dir / ".." / "c.yaml")) == f"{open_dir} is writable by every user (mode 0777)"


def _daemon(cfg):
    return subprocess.run([AGENTTRACE, "daemon", "--config", str(cfg), "--status-file", str(cfg.parent / "st.json")],
                          capture_output=True, text=True, timeout=60)


def test_daemon_refuses_files_others_could_change(tmp_path, require_bpf):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.yaml").write_text(RULE.format(port=9))
    (tmp_path / "allow.txt").write_text("pypi.org:443\n")
    cfg = tmp_path / "agenttrace.yaml"
    cfg.write_text("mode: enforce\nagents:\n  - cgroup: /agenttrace-none\nrules:\n  - rules\n"
                   "egress:\n  default:\n    mode: allow-list\n    action: block\n    allow_file: allow.txt\n")

    cfg.chmod(0o646)
    r = _daemon(cfg)
    assert r.returncode == 2, r.stderr
    assert f"{cfg}: refusing {cfg}: {cfg} is writable by every user (mode 0646)" in r.stderr
    cfg.chmod(0o644)

    # a rule file in a configured folder: the config's line and field name it
    os.chown(rules / "a.yaml", NOBODY, NOBODY)
    r = _daemon(cfg)
    assert r.returncode == 2, r.stderr
    assert f"{cfg}:5: rules[0]: refusing {rules / 'a.yaml'}: {rules / 'a.yaml'} is owned by uid {NOBODY}" in r.stderr
    os.chown(rules / "a.yaml", 0, 0)

    os.chown(tmp_path / "allow.txt", 0, NOBODY)
    (tmp_path / "allow.txt").chmod(0o664)
    r = _daemon(cfg)
    assert r.returncode == 2, r.stderr
    assert (f"{cfg}:10:17: egress.default.allow_file: refusing {tmp_path / 'allow.txt'}: "
            f"{tmp_path / 'allow.txt'} is writable by group {NOBODY}") in r.stderr
    # refused before anything started: no status file was written
    assert not (tmp_path / "st.json").exists()


def test_a_reload_refuses_a_rule_file_made_writable(tmp_path, agent_tree):
    """The check runs at every reload: a rules file made world-writable after the start keeps the
    running rules (reload_failed names the file); fixed again, the next reload goes through."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=9))
    agent_tree.agent("a1")
    d = Daemon(tmp_path, agent_tree.root, rules)
    try:
        d.start()
        assert d.wait_record(lambda r: r.get("phase") == "started")
        rules.chmod(0o666)
        d.proc.send_signal(signal.SIGHUP)
        failed = d.wait_record(lambda r: r.get("phase") == "reload_failed")
        assert failed and f"refusing {rules}: {rules} is writable by every user (mode 0666)" in failed[0]["error"], failed
        rules.chmod(0o644)
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_record(lambda r: r.get("phase") == "reloaded")
        assert d.stop() == 0
    finally:
        d.stop()


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_private_modes_pass(tmp_path, mode):
    f = tmp_path / "c.yaml"
    f.write_text("x\n")
    f.chmod(mode)
    assert untrusted_reason(str(f)) is None
