"""The README's main-job command: the demo runs end to end and cleans up after itself."""
import re


def test_demo_detects_everything_and_cleans_up(demo_run):
    r, _events, before, after = demo_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all behaviours detected" in r.stdout
    summary = r.stdout.split("=== summary")[1]
    assert "MISSED" not in summary and "unexpected" not in summary
    assert "detected, killed" in summary and "detected, blocked" in summary
    # nothing the demo made is left: the names it printed, so that other suites' labs on the
    # same machine, which come and go meanwhile, do not count
    m = re.search(r"^lab: network namespaces (\S+), (\S+); agent cgroups under (\S+)$", r.stdout, re.M)
    assert m, r.stdout[:2000]
    agent_ns, server_ns, root = m.groups()
    assert agent_ns not in after[1] and server_ns not in after[1], after
    assert root not in after[0], after
    assert agent_ns not in before[1] and root not in before[0]   # the names were new
