"""Fail-closed: SIGKILL of a tracer whose enforcement is pinned leaves its agents without a
way out (every non-loopback destination denied once the heartbeat is older than the grace),
and a new tracer replaces the pins with no gap. In the netlab, with an "external" web host."""
import errno
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path


from conftest import AGENTTRACE, _kill_and_rmdir, remove_pin_dir
from harness import Daemon, read_jsonl, wait_until

PY = sys.executable
WEB = "198.51.100.7"

LOOP = """
import errno, json, os, socket, subprocess, sys, time
out = open(sys.argv[1], "a", buffering=1)
out.write(json.dumps({"pid": os.getpid()}) + "\\n")
while True:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((sys.argv[2], 80))
        e = 0
    except OSError as ex:
        e = ex.errno or -1
    s.close()
    # and a new program: the exit status of /bin/true (-9: killed at its exec)
    x = subprocess.call(["/bin/true"]) if len(sys.argv) > 3 else None
    out.write(json.dumps({"t": time.monotonic(), "e": e, "x": x}) + "\\n")
    time.sleep(0.1)
"""


def _after(path, t0):
    return [r for r in read_jsonl(path) if "t" in r and r["t"] > t0]


def test_sigkill_of_run_enforce_fails_closed(netlab, tmp_path, cgroup2_root):
    name = f"failclosed-{uuid.uuid4().hex[:6]}"
    res = tmp_path / "loop.jsonl"
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    tracer = netlab.run_in_agent([AGENTTRACE, "run", "--mode", "enforce", "--no-rules", "--agent", name,
                                  "-o", str(tmp_path / "ev.jsonl"), "--", PY, str(script), str(res), WEB, "exec"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cg = cgroup2_root / "agenttrace" / name
    pins = Path("/sys/fs/bpf/agenttrace-run") / name
    try:
        # the agent reaches the web host and runs programs while its tracer lives
        assert wait_until(lambda: [r for r in read_jsonl(res) if r.get("e") == 0 and r.get("x") == 0]), \
            tracer.stderr.read() if tracer.poll() is not None else ""
        assert pins.is_dir() and any(pins.iterdir()), "enforce mode pins its cgroup programs"
        tracer.send_signal(signal.SIGKILL)
        tracer.wait()
        t_kill = time.monotonic()
        denied = wait_until(lambda: [r for r in _after(res, t_kill) if r["e"] == errno.EPERM], timeout=60)
        assert denied, _after(res, t_kill)[-5:]
        # once closed it stays closed: nothing got through after the first denial
        assert wait_until(lambda: len(_after(res, denied[0]["t"])) >= 5)
        assert all(r["e"] == errno.EPERM for r in _after(res, denied[0]["t"]))
        # the grace is 5 s by default: the first denial comes after it, and not long after
        assert denied[0]["t"] - t_kill < 5 + 10
        # and every exec is killed in the kernel from then on (proc.c): the agent starts nothing
        # its dead tracer's rules would have judged; the agent itself (no exec) lives on
        assert all(r["x"] == -9 for r in _after(res, denied[0]["t"])), _after(res, denied[0]["t"])[-5:]
        pid = next(r["pid"] for r in read_jsonl(res) if "pid" in r)
        assert Path(f"/proc/{pid}").exists()
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        _kill_and_rmdir(cg)
        remove_pin_dir(pins)


def test_daemon_sigkill_fails_closed_and_a_new_daemon_takes_over(netlab, tmp_path, agent_tree):
    pin_dir = Path(f"/sys/fs/bpf/agenttrace-test-{uuid.uuid4().hex[:8]}")
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent("""
        rules:
          - id: test-block-nothing
            description: test rule that never matches anything in this test
            category: egress
            severity: low
            on: [connect]
            match:
              dst: {cidrs: ["192.0.2.99/32"], ports: [9]}
            action: block
    """))
    a = agent_tree.agent("fc")
    res = tmp_path / "loop.jsonl"
    first = tmp_path / "first"
    first.mkdir()
    d = Daemon(first, agent_tree.root, rules, pin_dir, extra="")
    d.cfg.write_text(d.cfg.read_text().replace("path: " + str(pin_dir) + "}", "path: " + str(pin_dir) + ", grace_s: 1}"))
    d2 = None
    loop = None
    try:
        d.start()
        loop = netlab.run_in_agent([PY, "-c", LOOP, str(res), WEB, "exec"], cgroup=a,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: [r for r in read_jsonl(res) if r.get("e") == 0])
        pins = {f.name.split("-")[0] for f in pin_dir.iterdir()}
        assert pins == {"link", "rawtp"}, "cgroup links and the escape raw tracepoints are pinned"
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        t_kill = time.monotonic()
        denied = wait_until(lambda: [r for r in _after(res, t_kill) if r["e"] == errno.EPERM])
        assert denied, _after(res, t_kill)[-5:]
        # a new daemon attaches its own programs, then drops the dead one's pins
        second = tmp_path / "second"
        second.mkdir()
        d2 = Daemon(second, agent_tree.root, rules, pin_dir).start()
        t_new = time.monotonic()
        assert wait_until(lambda: [r for r in _after(res, t_new) if r["e"] == 0]), _after(res, t_new)[-5:]
    finally:
        if loop is not None:
            loop.kill()
            loop.wait()
        if d2 is not None:
            d2.stop()
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        if pin_dir.exists():
            for f in pin_dir.iterdir():
                f.unlink()
            pin_dir.rmdir()


def test_sigkill_of_run_cgroup_enforce_fails_closed_and_the_next_run_takes_over(netlab, tmp_path, agent_tree):
    from agenttrace.session.runner import cgroups_pin_dir
    a = agent_tree.agent("fc-cgroup")
    res = tmp_path / "loop.jsonl"
    pins = cgroups_pin_dir([agent_tree.root])

    def start_tracer(tag):
        out = tmp_path / f"{tag}.jsonl"
        p = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "--mode", "enforce",
                              "--no-rules", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_until(lambda: out.exists() and b'"started"' in out.read_bytes() or p.poll() is not None)
        assert p.poll() is None, p.stderr.read()
        return p

    t1 = start_tracer("first")
    t2 = loop = None
    try:
        # pinned before `started` is written: a kill right after it leaves the enforcement
        assert pins.is_dir() and any(f.name.startswith("link-") for f in pins.iterdir())
        loop = netlab.run_in_agent([PY, "-c", LOOP, str(res), WEB, "exec"], cgroup=a,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: [r for r in read_jsonl(res) if r.get("e") == 0])
        assert pins.is_dir() and any(f.name.startswith("link-") for f in pins.iterdir())
        t1.send_signal(signal.SIGKILL)
        t1.wait()
        t_kill = time.monotonic()
        closed = wait_until(lambda: [r for r in _after(res, t_kill) if r["e"] == errno.EPERM and r["x"] == -9])
        assert closed, _after(res, t_kill)[-5:]
        old = {f.name for f in pins.iterdir()}
        t2 = start_tracer("second")
        t_new = time.monotonic()
        # the next tracer opens both again: connects and execs go through
        assert wait_until(lambda: [r for r in _after(res, t_new) if r["e"] == 0 and r["x"] == 0]), \
            _after(res, t_new)[-5:]
        assert not old & {f.name for f in pins.iterdir()}, "the killed run's pins were replaced"
        t2.send_signal(signal.SIGTERM)
        assert t2.wait(timeout=60) == 0
        assert not pins.exists(), "a clean stop leaves no pins"
    finally:
        for p in (loop, t1, t2):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        remove_pin_dir(pins)
