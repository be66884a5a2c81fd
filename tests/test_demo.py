"""The README's main-job command: the demo runs end to end and cleans up after itself."""
import os
import subprocess

from conftest import AGENTTRACE


def _leftovers():
    from agenttrace.enrich.cgroups import cgroup2_mount
    cg = sorted(p.name for p in cgroup2_mount().iterdir() if p.name.startswith("agenttrace-demo-"))
    ns = sorted(n for n in os.listdir("/run/netns") if n.startswith("at-")) if os.path.isdir("/run/netns") else []
    return cg, ns


def test_demo_detects_everything_and_cleans_up(require_bpf):
    before = _leftovers()
    r = subprocess.run([AGENTTRACE, "demo", "--no-color"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all behaviours detected" in r.stdout
    summary = r.stdout.split("=== summary")[1]
    assert "MISSED" not in summary and "unexpected" not in summary
    assert "detected, killed" in summary and "detected, blocked" in summary
    after = _leftovers()
    # nothing the demo made is left (comparing additions: other labs may come and go)
    assert set(after[0]) <= set(before[0]) and set(after[1]) <= set(before[1]), (before, after)
