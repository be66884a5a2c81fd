"""Bad input: one clear line, exit 2, nothing left attached or created."""
import os
import signal
import subprocess
import time

import orjson
import pytest

from conftest import AGENTTRACE


def _agenttrace_cgroups():
    from agenttrace.cgroups import cgroup2_mount
    d = cgroup2_mount() / "agenttrace"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.exists() else []


def _run(*args, **kw):
    return subprocess.run([AGENTTRACE, *args], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("args,needle", [
    (["run", "--cgroup", "/does/not/exist"], "does not exist"),
    (["run", "--mode", "yolo", "--", "true"], "--mode: 'yolo'"),
    (["run", "--format", "xml", "--", "true"], "--format: 'xml'"),
    (["run", "--internal", "10.0.0.0/33", "--", "true"], "not a CIDR"),
    (["run"], "nothing to trace"),
    (["run", "--agent", "../x", "--", "true"], "--agent"),
    (["run", "--output", "/nonexistent-dir/x.jsonl", "--", "true"], "does not exist"),
    (["run", "--no-such-option"], "No such option"),
])
def test_bad_input_exits_2(args, needle, require_bpf):
    before = _agenttrace_cgroups()
    r = _run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert _agenttrace_cgroups() == before


def test_not_root_exits_2(require_bpf):
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        AGENTTRACE, "run", "--", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "must run as root" in r.stderr


def test_command_not_found_is_127_and_cleans_up(require_bpf):
    before = _agenttrace_cgroups()
    r = _run("run", "--", "/no/such/binary")
    assert r.returncode == 127 and "/no/such/binary" in r.stderr
    assert _agenttrace_cgroups() == before


def test_sigterm_detaches_and_removes_cgroup(tmp_path, require_bpf):
    out = tmp_path / "ev.jsonl"
    p = subprocess.Popen([AGENTTRACE, "run", "--output", str(out), "--agent", "sigterm-test", "--",
                          "sleep", "60"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and b'"started"' in out.read_bytes() and b'"exec"' in out.read_bytes():
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # the child got the TERM, agenttrace reports its death like a shell would
    assert rc == 128 + signal.SIGTERM
    recs = [orjson.loads(l) for l in out.read_bytes().splitlines()]
    assert recs[-1]["phase"] == "stopped"
    assert "sigterm-test" not in _agenttrace_cgroups()
    # no cgroup program remains attached anywhere under the cgroup2 mount from this run
    from agenttrace.cgroups import cgroup2_mount
    assert not (cgroup2_mount() / "agenttrace" / "sigterm-test").exists()


def test_version_and_doctor(require_bpf):
    assert _run("version").stdout.startswith("agenttrace ")
    r = _run("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "probes compile, verify and load" in r.stdout
