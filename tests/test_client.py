"""agenttrace.client against a real daemon: server-side filters (label episode=ep-7, kinds,
severity), resume without duplicates after a reconnect and after a daemon restart, the
`tail --label` equivalent, and examples/trainer_hook.py ending a misbehaving episode."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from conftest import AGENTTRACE, REPO
from harness import RULE as _RULE, Daemon, loopback_listener

from agenttrace.client import Client
from agenttrace.timefmt import parse_ns

PY = sys.executable
# one alert per offending process (the default de-dup would fold repeats into a later summary)
RULE = _RULE.rstrip() + "\n    dedup: {{fields: [proc.pid], seconds: 60}}\n"


class Collector:
    def __init__(self, client):
        self.client = client
        self.got: list = []
        self.latency_ms: list = []
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self._stop:
            rec = self.client.next(timeout=0.1)
            if rec is not None:
                self.latency_ms.append((time.time_ns() - parse_ns(rec["ts"])) / 1e6)
                self.got.append(rec)

    def wait(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.got) < n:
            time.sleep(0.05)
        return len(self.got) >= n

    def stop(self):
        self._stop = True
        self.t.join(10)
        self.client.close()


def _connect(tree, cg, port):
    return tree.run(cg, [PY, "-c", f"import socket; print(socket.socket().connect_ex(('127.0.0.1', {port})))"])


def test_client_filters_resume_and_restart(tmp_path, agent_tree, pin_dir):
    srv, port = loopback_listener()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=port))
    ep7, ep8 = agent_tree.agent("w7"), agent_tree.agent("w8")
    os.setxattr(ep7, "user.agenttrace.episode", b"ep-7")
    os.setxattr(ep8, "user.agenttrace.episode", b"ep-8")
    d = Daemon(tmp_path, agent_tree.root, rules, pin_dir)
    col = None
    try:
        d.start()
        col = Collector(Client(str(d.sock), labels={"episode": "ep-7"}, kinds=["alert"], min_severity="high"))
        assert d.wait_record(lambda r: r.get("phase") == "started")
        while col.client.instance is None:        # subscribed (hello seen)
            time.sleep(0.02)
        _connect(agent_tree, ep8, port)
        _connect(agent_tree, ep7, port)
        assert col.wait(1)
        assert d.wait_record(lambda r: r.get("kind") == "alert" and r["agent"].get("episode") == "ep-8")
        time.sleep(0.5)
        assert len(col.got) == 1
        first = col.got[0]
        assert first["agent"]["episode"] == "ep-7" and first["rule"]["id"] == f"test-block-{port}"
        assert first["rule"]["outcome"] == "blocked"

        # a dropped connection: resumes on the same daemon run after its last seq
        instance = col.client.instance
        col.client._sock.shutdown(socket.SHUT_RDWR)
        _connect(agent_tree, ep7, port)
        assert col.wait(2)
        assert col.client.instance == instance and col.client.stats["connects"] >= 2

        # the daemon restarts: the client reconnects by itself and gets what the new run wrote
        assert d.stop() == 0
        d.start()
        _connect(agent_tree, ep7, port)
        assert col.wait(3)
        time.sleep(1.0)
        assert col.client.instance != instance
        alerts = [r for r in col.got]
        assert len(alerts) == 3, [(r["ts"], r["agent"]["id"]) for r in alerts]
        assert len({json.dumps(r, sort_keys=True) for r in alerts}) == 3
        assert all(r["kind"] == "alert" and r["agent"]["episode"] == "ep-7" for r in alerts)
        file_alerts = [r for r in d.records() if r.get("kind") == "alert" and r["agent"].get("episode") == "ep-7"]
        assert sorted(r["ts"] for r in file_alerts) == sorted(r["ts"] for r in alerts)
        print(f"client latency ms (record ts to delivery): {[round(x, 1) for x in col.latency_ms]}")
        assert col.client.stats["duplicates_skipped"] == 0 and col.client.stats["delivered"] == 3

        # the CLI equivalent: tail --label through the daemon's filter
        tail = subprocess.Popen([AGENTTRACE, "tail", "--socket", str(d.sock), "--label", "episode=ep-8", "--no-color"],
                                stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            _connect(agent_tree, ep7, port)
            _connect(agent_tree, ep8, port)
            assert d.wait_record(lambda r: r.get("kind") == "alert" and r["agent"].get("episode") == "ep-8"
                                 and r["ts"] > alerts[-1]["ts"])
            time.sleep(1.0)
        finally:
            tail.terminate()
            out, _ = tail.communicate(timeout=30)
        lines = [l for l in out.splitlines() if l.strip()]
        assert lines and all("w8" in l for l in lines), lines
        assert not any("w7" in l for l in lines)
    finally:
        if col is not None:
            col.stop()
        d.stop()
        srv.close()


def test_trainer_hook_ends_misbehaving_episode(tmp_path, agent_tree, pin_dir):
    srv, port = loopback_listener()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(port=port))
    d = Daemon(tmp_path, agent_tree.root, rules, pin_dir)
    pen = tmp_path / "penalties.jsonl"
    # the episode reaches a forbidden port, then keeps going as if nothing happened
    episode = f"import socket, time\nsocket.socket().connect_ex(('127.0.0.1', {port}))\ntime.sleep(600)\n"
    try:
        d.start()
        assert d.wait_record(lambda r: r.get("phase") == "started")
        r = subprocess.run([PY, str(REPO / "examples" / "trainer_hook.py"), "--root", str(agent_tree.root),
                            "--episode", "ep-9", "--run-id", "r1", "--socket", str(d.sock),
                            "--penalties", str(pen), "--", PY, "-c", episode],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "ended for test-block" in r.stdout
        (p,) = [json.loads(x) for x in pen.read_text().splitlines()]
        assert p["episode"] == "ep-9" and p["penalty"] == -1.0 and p["severity"] == "high"
        assert not (agent_tree.root / "ep-9").exists()
        s = d.wait_record(lambda r: r.get("kind") == "summary" and r["agent"].get("episode") == "ep-9")
        assert s and s[0]["summary"]["alerts_by_rule"] == {f"test-block-{port}": {"blocked": 1}}
        assert s[0]["agent"]["run_id"] == "r1"
    finally:
        d.stop()
        srv.close()
