"""The daemon as systemd runs it: sd_notify on a socket the test opens, SIGHUP reloads (good
and bad), the root-only event socket, SIGTERM with pinned fail-closed enforcement, a
restart with no gap, and flood resistance."""
import errno
import json
import signal
import subprocess
import sys
import textwrap
import time


from conftest import AGENTTRACE
from harness import RULE, Daemon, Notify, connect_errno as _connect_errno, loopback_listener  # noqa: F401  (Notify: other modules import it from here)

PY = sys.executable


def test_daemon_lifecycle_reload_pinning_restart(tmp_path, agent_tree, pin_dir):
    srv, p1 = loopback_listener()
    srv2, p2 = loopback_listener()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=p1))
    a = agent_tree.agent("a1")
    d = Daemon(tmp_path, agent_tree.root, rules, pin_dir)
    d2 = None
    try:
        d.start()
        assert d.wait_record(lambda r: r.get("phase") == "started")
        # status for `agenttrace status`
        st = json.loads(d.status.read_text())
        assert st["mode"] == "enforce" and f"/{agent_tree.root.name}" in st["watched"]
        r = subprocess.run([AGENTTRACE, "status", "--status-file", str(d.status)], capture_output=True, text=True)
        assert r.returncode == 0 and "mode enforce" in r.stdout

        # the event socket: root reads the live stream, others may not connect
        from agenttrace.sinks.outputs import read_socket_records
        got = []
        import threading
        def reader():
            for rec in read_socket_records(str(d.sock), timeout=30):
                got.append(rec)
                if rec.get("kind") == "alert":
                    return
        th = threading.Thread(target=reader, daemon=True)
        th.start()
        time.sleep(0.3)
        assert _connect_errno(agent_tree, a, p1) == errno.EPERM
        th.join(30)
        assert any(x.get("kind") == "alert" and x["rule"]["id"] == f"test-block-{p1}" and
                   x["rule"]["outcome"] == "blocked" for x in got)
        nr = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-c",
                             f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({str(d.sock)!r})"],
                            capture_output=True, text=True)
        assert nr.returncode != 0 and "PermissionError" in nr.stderr

        # a bad reload keeps the old rules
        rules.write_text("rules:\n  - id: broken\n    on: [connect\n")
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_record(lambda r: r.get("phase") == "reload_failed")
        assert _connect_errno(agent_tree, a, p1) == errno.EPERM
        # a good reload swaps them without detaching
        rules.write_text(RULE.format(port=p2))
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_record(lambda r: r.get("phase") == "reloaded")
        assert _connect_errno(agent_tree, a, p2) == errno.EPERM
        assert _connect_errno(agent_tree, a, p1) == 0

        # SIGTERM: STOPPING, exit 0, the pinned enforcement stays (fail closed)
        assert d.stop() == 0
        assert any("STOPPING=1" in m for m in d.notify.msgs)
        assert d.records()[-1]["phase"] == "stopped"
        pins = sorted(p.name for p in pin_dir.iterdir())
        assert pins, "fail-closed mode must leave the enforcing links pinned"
        assert _connect_errno(agent_tree, a, p2) == errno.EPERM, "a forbidden connect got through while the daemon was down"

        # restart: new links first, then the old pins go; still enforcing, no gap
        second = tmp_path / "second"
        second.mkdir()
        d2 = Daemon(second, agent_tree.root, rules, pin_dir).start()
        new_pins = sorted(p.name for p in pin_dir.iterdir())
        assert new_pins and not set(new_pins) & set(pins)
        assert _connect_errno(agent_tree, a, p2) == errno.EPERM
    finally:
        d.stop()
        if d2 is not None:
            d2.stop()
        srv.close()
        srv2.close()


def test_daemon_bad_config_exits_2(tmp_path, require_bpf):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mode: enforce\nagents:\n  - cgroup: agents\n")
    r = subprocess.run([AGENTTRACE, "daemon", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{cfg}:3" in r.stderr and "cgroup" in r.stderr


def test_flooding_agent_cannot_blind_the_others(tmp_path, agent_tree, pin_dir):
    srv, port = loopback_listener()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=port))
    flooder, victim = agent_tree.agent("flooder"), agent_tree.agent("quiet")
    d = Daemon(tmp_path, agent_tree.root, rules, pin_dir,
               extra="limits:\n  agent_events_per_sec: 200\n  ring_buffer_pages: 64\n  flood_action: report\n")
    storm = None
    try:
        d.start()
        storm = agent_tree.spawn(flooder, [PY, "-c", textwrap.dedent("""
            import os
            for _ in range(3000):
                os.waitpid(os.posix_spawn('/bin/true', ['/bin/true'], {}), 0)
        """)])
        time.sleep(0.5)
        assert _connect_errno(agent_tree, victim, port) == errno.EPERM
        storm.wait(timeout=120)
        hit = d.wait_record(lambda r: r.get("kind") == "alert" and r["agent"]["id"] == "quiet"
                            and r["rule"]["id"] == f"test-block-{port}")
        assert hit, "the quiet agent's alert was lost in the other agent's flood"
        dropped = d.wait_record(lambda r: r.get("kind") == "alert" and r["rule"]["id"] == "agenttrace-events-dropped")
        assert dropped and dropped[0]["agent"]["id"] == "flooder"
    finally:
        if storm and storm.poll() is None:
            storm.kill()
            storm.wait()
        d.stop()
        srv.close()
    stopped = d.records()[-1]
    assert stopped["drops"]["rate_limited_by_agent"].get("flooder", 0) > 0
    assert "quiet" not in stopped["drops"]["rate_limited_by_agent"]
