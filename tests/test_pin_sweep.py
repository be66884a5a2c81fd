"""Which pins a starting `run -- CMD --mode enforce` sweeps (session/isolation.sweep_stale_pins).

A run sweeps the pin folders of earlier runs whose agent is gone. It must leave alone a
`run --cgroup` tracer's folder (killed, its pins are the fail-closed state of those cgroups
until a run on them replaces it) and a folder a live tracer is pinning into (a concurrent run
between pinning and starting its command has an empty cgroup too), and not fail when another
run removes folders meanwhile. Plain files in a temporary folder stand in for the bpffs pins.
"""
from __future__ import annotations

import os
import subprocess

from agenttrace.session import isolation


def _dead_pid() -> int:
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    return p.pid


def _folder(root, name, pid):
    d = root / name
    d.mkdir()
    (d / f"link-1-2-0-{pid}").write_text("")
    (d / f"rawtp-sched_process_fork-{pid}").write_text("")
    return d


def test_sweep_keeps_cgroup_runs_live_tracers_and_busy_agents(tmp_path, monkeypatch):
    pins, parent = tmp_path / "pins", tmp_path / "cgroups"
    pins.mkdir()
    parent.mkdir()
    monkeypatch.setattr(isolation, "RUN_PIN_ROOT", pins)
    dead = _dead_pid()
    gone = _folder(pins, "agent-gone", dead)                 # its agent and tracer are gone
    killed_cgroup_run = _folder(pins, "cgroups-agents_x", dead)
    pinning_now = _folder(pins, "agent-starting", os.getpid())
    busy = _folder(pins, "agent-busy", dead)
    (parent / "agent-busy").mkdir()
    monkeypatch.setattr("agenttrace.enrich.cgroups.procs", lambda cg: [1] if cg.name == "agent-busy" else [])
    assert isolation.sweep_stale_pins(parent) == ["agent-gone"]
    assert not gone.exists()
    for d in (killed_cgroup_run, pinning_now, busy):
        assert len(list(d.iterdir())) == 2, d


def test_sweep_without_a_pin_root_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(isolation, "RUN_PIN_ROOT", tmp_path / "absent")
    assert isolation.sweep_stale_pins(tmp_path) == []
