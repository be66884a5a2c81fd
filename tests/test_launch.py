"""The entry point's look at `agenttrace run`'s command line (agenttrace/launch.py): it knows
every option of the command, reads the ones the probe plan depends on as click does, starts
nothing where it is unsure, and the prefetch it starts is adopted by the session (the
`started` record says `prefetch: launch`) or closed when the command's own guess differs."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import AGENTTRACE, need_bpf
from test_prefetch import _bpf_fds

from agenttrace import launch


def _run_options():
    import typer.main

    from agenttrace.cli import app
    cmd = typer.main.get_command(app).commands["run"]
    values, flags = set(), set()
    for p in cmd.params:
        if getattr(p, "param_type_name", "") != "option":
            continue
        names = set(p.opts) | set(p.secondary_opts)
        (flags if p.is_flag else values).update(names)
    return values, flags


def test_the_look_knows_every_option_of_run_by_kind():
    """A new option of `run` must be added to runargs.py's tables (read through launch.py) (else a command line with it
    would go without the early prefetch, silently slower): this fails until it is."""
    values, flags = _run_options()
    assert values == launch.RUN_VALUE_OPTIONS
    assert flags - {"--help"} == launch.RUN_FLAGS


@pytest.mark.parametrize("argv, want", [
    ([], {"flags": [], "rules": [], "gpu": "allow", "allow_egress": False, "wakeup_ms": 5.0}),
    (["--cgroup", "a", "--mode=enforce", "-o", "/tmp/x", "--no-flow"],
     {"flags": ["--no-flow"], "rules": [], "gpu": "allow", "allow_egress": False, "wakeup_ms": 5.0}),
    (["-r", "a.yaml", "--rules=b.yaml", "-rc.yaml", "--gpu", "off", "--wakeup-ms=0"],
     {"flags": [], "rules": ["a.yaml", "b.yaml", "c.yaml"], "gpu": "off", "allow_egress": False, "wakeup_ms": 0.0}),
    (["--allow-egress", "@list", "--files", "--no-files", "--", "sh", "-c", "--no-net"],
     {"flags": ["--files", "--no-files"], "rules": [], "gpu": "allow", "allow_egress": True, "wakeup_ms": 5.0}),
    # the first word that is not an option begins CMD (allow_interspersed_args off)
    (["sh", "--no-net"], {"flags": [], "rules": [], "gpu": "allow", "allow_egress": False, "wakeup_ms": 5.0}),
])
def test_the_look_reads_what_the_plan_depends_on(argv, want):
    assert launch.run_plan_args(argv) == want


@pytest.mark.parametrize("argv", [
    ["--help"], ["--bogus"], ["--cgroup"], ["--wakeup-ms", "fast"], ["--no-net=1"], ["-x"],
])
def test_the_look_starts_nothing_where_it_is_unsure(argv):
    assert launch.run_plan_args(argv) is None
    assert launch.early_prefetch(["run", *argv]) is None


def test_other_commands_start_nothing():
    for argv in (["tail"], ["daemon", "--config", "x"], ["doctor"], []):
        assert launch.early_prefetch(argv) is None


def test_flag_pairs_read_as_click_reads_them():
    assert launch._last(["--files", "--no-files"], "--files", "--no-files") is False
    assert launch._last(["--no-files", "--files"], "--files", "--no-files") is True
    assert launch._last([], "--files", "--no-files") is False


def _started(*args) -> dict:
    p = subprocess.run([AGENTTRACE, "run", *args, "--", "true"], capture_output=True, text=True, timeout=180,
                       env={k: v for k, v in os.environ.items() if k != "AGENTTRACE_PREFETCH"})
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return next(r for r in recs if r.get("kind") == "lifecycle" and r.get("phase") == "started")


@pytest.mark.parametrize("args", [
    (),
    ("--gpu", "off", "--no-dns", "--wakeup-ms", "2", "--allow-egress", "10.1.0.0/16:443", "--mode", "enforce"),
])
def test_run_adopts_the_prefetch_started_at_launch(args):
    """As a user starts it: the programs the session runs were verified from the command
    line's guess. The first start may compile (a fresh machine's cache): the second is warm."""
    need_bpf()
    first = _started(*args)
    again = _started(*args)
    assert again["prefetch"] == "launch", (first.get("prefetch"), again.get("prefetch"))
    assert again["probes"] == first["probes"]


def test_a_launch_guess_the_command_does_not_share_is_closed(monkeypatch):
    """The session's own guess decides: a launch prefetch for another plan is closed (its
    maps and programs with it) and a prefetch of the right plan started instead."""
    need_bpf()
    import agenttrace.session as S
    from agenttrace.session import probeplan
    monkeypatch.delenv("AGENTTRACE_PREFETCH", raising=False)
    before = _bpf_fds()
    early = probeplan.start_early(S.SessionOptions(features=("proc",), use_rules=False, gpu=None))
    assert early is not None and early.started == "launch"
    own = probeplan.prefetch(S.SessionOptions(features=("proc", "net"), use_rules=False, gpu=None))
    try:
        assert own is not early and own.started == "options"
        assert early.outcome == "replaced" and early.wait(60)
        assert probeplan._early is None
    finally:
        probeplan.discard(own)
        own.wait(60)
    assert _bpf_fds() == before


def test_a_launch_guess_the_command_shares_is_adopted(monkeypatch):
    need_bpf()
    import agenttrace.session as S
    from agenttrace.session import probeplan
    monkeypatch.delenv("AGENTTRACE_PREFETCH", raising=False)
    before = _bpf_fds()
    early = probeplan.start_early(S.SessionOptions(features=("proc",), use_rules=False, gpu=None))
    try:
        assert probeplan.prefetch(S.SessionOptions(features=("proc",), use_rules=False, gpu=None)) is early
    finally:
        probeplan.discard(early)
        early.wait(60)
    assert _bpf_fds() == before
