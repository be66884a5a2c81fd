"""The watched agent is an adversary: it cannot crash a reload, starve the reader, flood
others into blind spots, or outlive enforcement by killing the tracer (issue 16)."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson

from conftest import AGENTTRACE as AGENTTRACE_BIN
from harness import RULE, Daemon, Notify, connect_errno as _connect_errno, loopback_listener

PY = sys.executable


def _unholdable_rules(first_port: int) -> str:
    # five blocks on one /32: the kernel's destination map has four slots per prefix, so the
    # rule set loads and lints but cannot be written into the maps (EnforceError at apply)
    return "rules:\n" + "".join(f"""
  - id: unholdable-{p}
    description: one of five blocks sharing a prefix
    category: egress
    severity: high
    on: [connect]
    match:
      dst: {{cidrs: ["127.0.0.1/32"], ports: [{p}]}}
    action: block
""" for p in range(first_port, first_port + 5))


def test_reload_that_cannot_be_held_keeps_the_old_policy(tmp_path, agent_tree, pin_dir):
    srv, port = loopback_listener()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=port))
    a = agent_tree.agent("a1")
    d = Daemon(tmp_path, agent_tree.root, rules, pin_dir)
    # stderr is "the journal": JOURNAL_STREAM names its pipe, as systemd does, so the
    # daemon's diagnostics must carry syslog priority prefixes
    r_fd, w_fd = os.pipe()
    st = os.fstat(w_fd)
    d.notify = Notify(tmp_path / "notify")
    env = dict(os.environ, NOTIFY_SOCKET=d.notify.path, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    d.proc = subprocess.Popen([AGENTTRACE_BIN, "daemon", "--config", str(d.cfg), "--status-file", str(d.status)],
                              env=env, stderr=w_fd)
    os.close(w_fd)
    journal = os.fdopen(r_fd, "rb")
    try:
        assert d.notify.wait("READY=1")
        assert d.wait_record(lambda r: r.get("phase") == "started")
        assert _connect_errno(agent_tree, a, port) == errno.EPERM
        from agenttrace.match.rules import load_rules
        rules.write_text(_unholdable_rules(41001))
        load_rules([str(rules)])            # valid rules: only the maps refuse them
        d.proc.send_signal(signal.SIGHUP)
        failed = d.wait_record(lambda r: r.get("phase") == "reload_failed")
        assert failed, d.stderr()
        assert "more than 4 policy entries" in failed[0]["error"]
        assert d.proc.poll() is None, "a reload that cannot be applied took the daemon down"
        # the old rule still blocks, and the new set left nothing behind
        assert _connect_errno(agent_tree, a, port) == errno.EPERM
        with socket.socket() as s2:
            s2.bind(("127.0.0.1", 41001))
            s2.listen(4)
            assert _connect_errno(agent_tree, a, 41001) == 0
        # the kernel said so in the records too: blocked before and after the failed reload
        blocked = d.wait_record(lambda r: r.get("kind") == "connect" and r["net"]["dst"]["port"] == port
                                and r["net"]["verdict"] == "blocked")
        assert len(blocked) >= 2
        # and a good reload after the failed one still works
        rules.write_text(RULE.format(port=41002))
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_record(lambda r: r.get("phase") == "reloaded")
        assert _connect_errno(agent_tree, a, 41002) == errno.EPERM
    finally:
        d.stop()
        srv.close()
    diag = journal.read().decode(errors="replace").splitlines()
    journal.close()
    assert any(l.startswith("<3>agenttrace: reload failed") for l in diag), diag
    assert all(l[:1] == "<" and l[2:3] == ">" for l in diag if l), diag


class NotifyLog:
    """The sd_notify socket, read on its own thread so each datagram's arrival is noted."""

    def __init__(self, path):
        import threading
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.msgs: list[tuple[float, str]] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                self.msgs.append((time.time(), self.sock.recv(4096).decode()))
            except socket.timeout:
                pass
            except OSError:
                return

    def wait(self, token, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(token in m for _, m in self.msgs):
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close()


def _ts(rec) -> float:
    from datetime import datetime
    return datetime.fromisoformat(rec["ts"][:26].rstrip("Z") + "+00:00").timestamp()


def _max_gap(times, start, end) -> float:
    pts = [start] + sorted(t for t in times if start <= t <= end) + [end]
    return max(b - a for a, b in zip(pts, pts[1:]))


# Long enough for many intervals of every schedule checked (stats 1 s, drop alerts 1 s,
# watchdog 3 s), short enough for a shared 2-core CI machine; bench runs it longer.
# 8 s in the suite (eight one-second stats intervals; a stalled reader showed 3 s gaps); the
# 30 s of the README's figures with AGENTTRACE_FLOOD_S=30
FLOOD_S = float(os.environ.get("AGENTTRACE_FLOOD_S", "8"))
UDP_FLOOD = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    end = time.monotonic() + float(sys.argv[1])
    n = 0
    while time.monotonic() < end:
        for port in range(1024, 65535):
            # a new (socket, destination) each time: one connect record per datagram
            s.sendto(b"x", ("127.0.%d.%d" % (n % 250, 1 + port % 250), port))
        n += 1
""")


def _schedule_records(path: Path) -> tuple[list[dict], dict]:
    """The records the schedule checks read (stats, lifecycle phases, drop alerts) and the
    file's last record. Every other line is a connect record of the flood (~140k, 240 MB here):
    parsing them all took ~6 s, and none can match a check below, since each check needs a
    "phase" key or the drop rule's id in the line."""
    lines = [l for l in path.read_bytes().splitlines() if l.strip()]
    keep = [orjson.loads(l) for l in lines if b'"phase"' in l or b"agenttrace-events-dropped" in l]
    return keep, orjson.loads(lines[-1])


def test_reader_keeps_its_schedule_under_a_flood_it_cannot_keep_up_with(tmp_path, agent_tree, pin_dir):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=9))
    flooder = agent_tree.agent("flooder")
    d = Daemon(tmp_path, agent_tree.root, rules, pin_dir, extra=textwrap.dedent("""
        limits:
          agent_events_per_sec: 0
          ring_buffer_pages: 64
          flood_action: report
          stats_interval: 1
    """))
    # the reader takes ~50k records/s here, each ~700 bytes as JSON: the file lives in RAM
    # (/dev/shm), unrotated, so every stats and alert record written is still there to check
    import shutil
    import uuid
    shm = Path("/dev/shm") / f"agenttrace-test-{uuid.uuid4().hex[:8]}"
    shm.mkdir()
    d.out = shm / "events.jsonl"
    d.cfg.write_text(d.cfg.read_text().replace(f"file: {{path: {tmp_path / 'events.jsonl'}}}",
                                               f"file: {{path: {d.out}, max_bytes: 8GiB}}"))
    assert str(d.out) in d.cfg.read_text()
    d.notify = NotifyLog(tmp_path / "notify")
    env = dict(os.environ, NOTIFY_SOCKET=d.notify.path, WATCHDOG_USEC="6000000")
    env.pop("WATCHDOG_PID", None)
    d.proc = subprocess.Popen([AGENTTRACE_BIN, "daemon", "--config", str(d.cfg), "--status-file", str(d.status)],
                              env=env, stderr=subprocess.PIPE)
    storm = None
    try:
        assert d.notify.wait("READY=1"), d.stderr()
        t0 = time.time()
        storm = agent_tree.spawn(flooder, [PY, "-c", UDP_FLOOD, str(FLOOD_S)])
        storm.wait(timeout=FLOOD_S + 120)
        t1 = time.time()
        time.sleep(1.5)
    finally:
        if storm and storm.poll() is None:
            storm.kill()
            storm.wait()
        d.stop()
        recs, last = _schedule_records(d.out)
        shutil.rmtree(shm)
    stopped = last
    assert stopped["phase"] == "stopped"
    lost = stopped["drops"]["kernel_by_agent"].get("flooder", 0)
    taken = stopped["events_by_kind"].get("connect", 0)
    assert lost > 0 and taken > 0, "the flood must outrun the reader for this test to mean anything"
    # schedules, asserted from the records' own timestamps over the flood window
    w0, w1 = t0 + 2, t1 - 0.5
    stats = [_ts(r) for r in recs if r.get("phase") == "stats"]
    drops = [_ts(r) for r in recs if r.get("kind") == "alert" and r["rule"]["id"] == "agenttrace-events-dropped"]
    pings = [t for t, m in d.notify.msgs if "WATCHDOG=1" in m]
    assert _max_gap(stats, w0, w1) < 3.0, f"stats every 1 s, got {sorted(stats)}"
    assert _max_gap(drops, w0, w1) < 3.0, f"drop alerts every 1 s while dropping, got {sorted(drops)}"
    assert _max_gap(pings, w0, w1) < 6.0, f"watchdog pings every 3 s (timeout 6 s), got {pings}"
    # nothing lost silently: the stats records account for the drops by agent and cause
    last_stats = [r for r in recs if r.get("phase") == "stats"][-1]
    assert last_stats["drops"]["kernel_by_agent"].get("flooder", 0) > 0
    print(f"flood {FLOOD_S:.0f}s: taken {taken} connect records, dropped {lost} (ring full), "
          f"stats {len(stats)}, drop alerts {len(drops)}, watchdog pings {len(pings)}, "
          f"max gaps stats {_max_gap(stats, w0, w1):.2f}s drops {_max_gap(drops, w0, w1):.2f}s "
          f"pings {_max_gap(pings, w0, w1):.2f}s")


# --- `run` isolation -------------------------------------------------------------------------
BLOCK_EXTERNAL = """
rules:
  - id: test-no-external
    description: test rule, no connection to external addresses
    category: egress
    severity: high
    on: [connect]
    match:
      dst: {scopes: [external]}
    action: block
  - id: test-stratum-args
    description: test rule, a userspace-decided kill (args are matched in the reader)
    category: mining
    severity: critical
    on: [exec]
    match:
      exe: {cmdline_regex: ['stratum\\+tcp://']}
    action: kill
"""
CONNECT = ("import socket,sys; s=socket.socket(); s.settimeout(5); "
           "print(sys.argv[1], s.connect_ex(('203.0.113.10', 22)), flush=True)")


def _run_cleanup(name):
    from agenttrace.enrich.cgroups import cgroup2_mount
    from agenttrace.session.isolation import run_pin_dir
    from conftest import _kill_and_rmdir
    _kill_and_rmdir(cgroup2_mount() / "agenttrace" / name)
    d = run_pin_dir(name)
    if d.exists():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def test_run_enforcement_outlives_kill_of_its_tracer(netlab, tmp_path, require_bpf):
    """`kill -9 $PPID` from the agent kills `agenttrace run`; the pinned programs keep the
    agent from reaching an external address."""
    import uuid
    name = f"adv-{uuid.uuid4().hex[:6]}"
    rules = tmp_path / "rules.yaml"
    rules.write_text(BLOCK_EXTERNAL)
    out = tmp_path / "agent.out"
    script = (f"{PY} -c \"{CONNECT}\" before >> {out}; kill -9 $PPID; sleep 1; "
              f"{PY} -c \"{CONNECT}\" after >> {out}")
    tracer = netlab.run_in_agent([AGENTTRACE_BIN, "run", "--mode", "enforce", "--rules", str(rules), "--agent", name,
                                  "--output", str(tmp_path / "ev.jsonl"), "--", "sh", "-c", script],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        rc = tracer.wait(timeout=120)
        assert rc == -signal.SIGKILL, tracer.stderr.read()
        from agenttrace.enrich.cgroups import cgroup2_mount, procs
        cg = cgroup2_mount() / "agenttrace" / name
        deadline = time.monotonic() + 30
        while procs(cg) and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = dict(l.split() for l in out.read_text().splitlines())
        assert lines["before"] == str(errno.EPERM)
        assert lines["after"] == str(errno.EPERM), "the agent reached an external address once its tracer was killed"
        from agenttrace.session.isolation import run_pin_dir
        assert any(run_pin_dir(name).iterdir())
        # the next run sweeps pins whose agent is gone
        r = subprocess.run([AGENTTRACE_BIN, "run", "--mode", "enforce", "--rules", str(rules), "--no-net",
                            "--agent", name + "x", "--output", str(tmp_path / "ev2.jsonl"), "--", "true"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert not run_pin_dir(name).exists()
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        _run_cleanup(name)
        _run_cleanup(name + "x")


def test_run_survives_group_kill_and_a_stopped_terminal(netlab, tmp_path, require_bpf):
    """The agent stops output on the terminal it shares with the tracer (TCOOFF on a pty the
    test provides), floods it, then kills its whole process group: the tracer keeps reading
    and acting (a userspace-decided kill still happens), the kernel keeps blocking, and the
    tracer ends by itself with the agent's exit code."""
    import pty
    import uuid
    name = f"adv-{uuid.uuid4().hex[:6]}"
    rules = tmp_path / "rules.yaml"
    rules.write_text(BLOCK_EXTERNAL)
    out = tmp_path / "agent.out"
    script = (
        # the agent's own messages (the shell's "Killed") would block on the stopped terminal
        f"exec 2>>{out}.err; {PY} -c 'import termios; termios.tcflow(1, termios.TCOOFF)'; "
        "for i in $(seq 200); do /bin/true; done; "
        f"{PY} -c 'import time; time.sleep(60)' stratum+tcp://pool.example:3333; echo stratum $? >> {out}; "
        f"{PY} -c \"{CONNECT}\" connect >> {out}; "
        f"echo pgid $(ps -o pgid= $$) >> {out}; kill -9 -$(ps -o pgid= $$ | tr -d ' ')")
    # a file, not `sh -c`: the shell's own command line must not carry the pool URL
    (tmp_path / "agent.sh").write_text(script + "\n")
    master, slave = pty.openpty()
    tracer = netlab.run_in_agent([AGENTTRACE_BIN, "run", "--mode", "enforce", "--rules", str(rules),
                                  "--agent", name, "--", "sh", str(tmp_path / "agent.sh")],
                                 stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        rc = tracer.wait(timeout=90)
        got = dict(l.split(None, 1) for l in out.read_text().splitlines())
        assert got["stratum"].strip() == "137", "the reader stopped acting while the terminal was stopped"
        assert got["connect"].split()[-1] == str(errno.EPERM)
        assert int(got["pgid"]) != os.getpgid(0)
        assert rc == 137, f"the tracer did not end by itself with the agent's code (rc {rc})"
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        os.close(master)
        _run_cleanup(name)


def test_run_user_runs_the_command_unprivileged(tmp_path, require_bpf):
    ev = tmp_path / "ev.jsonl"
    r = subprocess.run([AGENTTRACE_BIN, "run", "--no-rules", "--user", "nobody", "--output", str(ev), "--",
                        "sh", "-c", "id -u; id -g; touch /root/agenttrace-should-not-exist"],
                       capture_output=True, text=True, timeout=120)
    import pwd
    nobody = pwd.getpwnam("nobody")
    assert r.stdout.split()[:2] == [str(nobody.pw_uid), str(nobody.pw_gid)], r.stderr
    assert r.returncode != 0 and "Permission denied" in r.stderr
    import orjson
    recs = [orjson.loads(l) for l in ev.read_bytes().splitlines()]
    ids = [x["proc"]["uid"] for x in recs if x["kind"] == "exec" and x["proc"]["exe"].endswith("/id")]
    assert ids and set(ids) == {nobody.pw_uid}
    bad = subprocess.run([AGENTTRACE_BIN, "run", "--user", "no-such-user-x", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such user" in bad.stderr


# --- flood handling --------------------------------------------------------------------------
FLOODER = textwrap.dedent("""
    import os, socket, sys, time
    # a bounded fork bomb: a tree of depth 7 (255 processes), every node execs twice
    def node(depth):
        kids = []
        for _ in range(2 if depth else 0):
            pid = os.fork()
            if pid == 0:
                node(depth - 1)
                os._exit(0)
            kids.append(pid)
        for _ in range(2):
            os.waitpid(os.posix_spawn('/bin/true', ['/bin/true'], {}), 0)
        for k in kids:
            os.waitpid(k, 0)
    node(7)
    # then a connect flood at full speed (one record per new destination)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    end = time.monotonic() + float(sys.argv[1])
    n = 0
    while time.monotonic() < end:
        for port in range(1024, 65535):
            s.sendto(b"x", ("127.0.%d.%d" % (n % 250, 1 + port % 250), port))
        n += 1
""")


def test_flooder_is_frozen_and_its_neighbour_is_still_seen_and_blocked(netlab, tmp_path, agent_tree, pin_dir):
    from agenttrace.paths import rules_dir
    flooder, victim = agent_tree.agent("flooder"), agent_tree.agent("victim")
    d = Daemon(tmp_path, agent_tree.root, rules_dir(), pin_dir, extra=textwrap.dedent("""
        limits:
          agent_events_per_sec: 2000
          ring_buffer_pages: 256
    """))
    storm = ssh = None
    try:
        d.start()
        assert d.wait_record(lambda r: r.get("phase") == "started")
        storm = agent_tree.spawn(flooder, [PY, "-c", FLOODER, "8"])
        time.sleep(0.3)
        ssh = netlab.run_in_agent(netlab.ssh_argv(netlab.ssh_host, 22, "-N", "-R", "9000:127.0.0.1:8000"),
                                  cgroup=victim, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        meta = netlab.python_in_agent("import socket; print(socket.socket().connect_ex(('169.254.169.254', 80)))",
                                      cgroup=victim)
        assert int(meta.stdout) == errno.EPERM, meta.stderr
        assert ssh.wait(timeout=60) != 0, "ssh -R to an external host must not get through"
        want = {"egress-metadata-address", "tunnel-ssh-forwarding"}
        got = d.wait_record(lambda r: r.get("kind") == "alert" and r["agent"]["id"] == "victim"
                            and r["rule"]["id"] in want, timeout=30)
        deadline = time.monotonic() + 30
        while {a["rule"]["id"] for a in got} != want and time.monotonic() < deadline:
            time.sleep(0.2)
            got = [r for r in d.records() if r.get("kind") == "alert" and r["agent"]["id"] == "victim"
                   and r["rule"]["id"] in want]
        assert {a["rule"]["id"] for a in got} == want, [a["rule"]["id"] for a in got]
        frozen = d.wait_record(lambda r: r.get("kind") == "alert" and r["rule"]["id"] == "agenttrace-events-dropped"
                               and r["rule"]["outcome"] == "frozen", timeout=30)
        assert frozen and frozen[0]["agent"]["id"] == "flooder"
        assert "exceeded its own rate limit" in frozen[0]["rule"]["message"]
        assert (flooder / "cgroup.events").read_text().count("frozen 1") == 1
        assert "frozen 0" in (victim / "cgroup.events").read_text()
    finally:
        for p in (storm, ssh):
            if p is not None and p.poll() is None:
                p.kill()
        (flooder / "cgroup.kill").write_text("1")
        if storm is not None:
            storm.wait(timeout=30)
        d.stop()
    recs = d.records()
    by_rule = {}
    for a in recs:
        if a.get("kind") == "alert" and a["agent"] and a["agent"]["id"] == "victim":
            by_rule.setdefault(a["rule"]["id"], a)
    # the metadata connect was blocked in the kernel; the ssh forwarding stopped one way or
    # the other (killed from userspace, or it exited on the kernel's block of port 22 first)
    assert by_rule["egress-metadata-address"]["rule"]["outcome"] == "blocked"
    assert by_rule["tunnel-ssh-forwarding"]["rule"]["outcome"] in ("killed", "exited")
    # Not starved: both alerts were awaited (above) while the flood still ran, so they came
    # ahead of the flooder's backlog, not after it. How soon is a figure, not an assertion: it
    # was 0.1-0.5 s on a quiet machine and 1.3-2.1 s with five test suites sharing 2 cores.
    latencies = {rid: _ts({"ts": a["alerted"]}) - _ts(a) for rid, a in by_rule.items()}
    assert all(v >= 0 for v in latencies.values()), latencies   # alerted after its trigger
    # nothing else frozen, drops counted per agent and cause
    assert not [a for a in recs if a.get("kind") == "alert" and a["rule"]["outcome"] == "frozen"
                and a["agent"]["id"] != "flooder"]
    stopped = recs[-1]
    assert stopped["drops"]["rate_limited_by_agent"].get("flooder", 0) > 0
    assert "victim" not in stopped["drops"]["rate_limited_by_agent"]
    assert "victim" not in stopped["drops"]["kernel_by_agent"]
    print(f"flood: generated {stopped['events']} records + {stopped['drops']['kernel']} dropped "
          f"({stopped['drops']['rate_limited_by_agent']} rate limit, {stopped['drops']['kernel_by_agent']} total by agent); "
          f"victim alert latency {max(latencies.values()) * 1000:.1f} ms")
