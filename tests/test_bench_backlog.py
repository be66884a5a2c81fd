"""bench/backlog.py: the tracer's CPU per record read behind a storm (stopped while it ran) against
read live, run as `python -m bench.backlog` is. No timing is asserted: only that both ways read
every record of every storm, that the figures are there and that the report shows them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import backlog

REPO = Path(__file__).resolve().parent.parent


def test_render_shows_each_build_or_why_not():
    res = {"n": 100, "pairs": 2, "builds": {
        "after": {"runs": [{"behind": False, "records": 200, "pair": 0}, {"behind": True, "records": 200, "pair": 0}],
                  "live_us_per_record": 5.0, "behind_us_per_record": 5.5, "ratio_per_pair": [1.1, 1.0],
                  "ratio": 1.05, "ratio_ci": None},
        "before": {"error": "no before build given"}}}
    text = backlog.render(res, "##")
    assert text.startswith("## Backlog") and "| after | 5.00 | 5.50 | 1.05x (1.10, 1.00) |" in text
    assert "| before | - | - | no before build given |" in text
    assert "not selected" in backlog.render({"status": "not measured: not selected by --only"})


def test_backlog_through_its_command(tmp_path):
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup").exists():
        if os.environ.get("AGENTTRACE_REQUIRE_BPF") == "1":
            pytest.fail("AGENTTRACE_REQUIRE_BPF=1 but not root")
        pytest.skip("needs root")
    r = subprocess.run([sys.executable, "-m", "bench.backlog", "--pairs", "2", "--n", "300", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "backlog.json").read_text())
    after = res["builds"]["after"]
    assert [x["behind"] for x in after["runs"]] == [False, True, True, False]
    for run in after["runs"]:
        # a connect and its accept per connection, every one read, also after the generator exited
        assert run["n"] == 300 and run["records"] >= 600 and run["tracer_cpu_ns"] > 0, run
    assert after["drops"] == [0, 0]
    assert after["live_us_per_record"] > 0 and after["behind_us_per_record"] > 0 and after["ratio"] > 0
    assert "| after |" in (tmp_path / "backlog.md").read_text()
    # nothing left behind: the temporary agent cgroup is gone
    from bench import sysinfo
    assert not list(sysinfo.cgroup2_mount().glob("agenttrace-bench-*-backlog"))
