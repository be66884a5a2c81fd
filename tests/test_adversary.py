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

import pytest

from conftest import AGENTTRACE as AGENTTRACE_BIN
from test_daemon import RULE, Daemon, _connect_errno, pin_dir  # noqa: F401  (fixture)

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
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=port))
    a = agent_tree.agent("a1")
    d = Daemon(tmp_path, agent_tree.root, rules, pin_dir)
    try:
        d.start()
        assert d.wait_record(lambda r: r.get("phase") == "started")
        assert _connect_errno(agent_tree, a, port) == errno.EPERM
        from agenttrace.rules import load_rules
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
FLOOD_S = float(os.environ.get("AGENTTRACE_FLOOD_S", "15"))
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
        recs = d.records()
        shutil.rmtree(shm)
    stopped = recs[-1]
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
