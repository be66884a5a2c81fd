"""Scans at several horizons: a 40-port scan paced over 60 s, a host sweep, and the fast
scan, driven through the engine's clock (no waiting); plus a live listener on all
interfaces through the CLI."""
from __future__ import annotations

import subprocess
import sys

import orjson

from conftest import AGENTTRACE
from agenttrace.clock import FakeClock
from agenttrace.match.engine import Engine
from agenttrace.session.event import Event
from agenttrace.match.rules import default_rule_paths, load_rules
import os

# unique per test run: `run -- CMD` locks its agent name, and another checkout's suite may run
# this same test at the same time
_AGENT_BINDER = f"binder-{os.getpid()}"

AGENT = {"id": "ep-9", "cgroup": "/agents/ep-9", "cgroup_id": 99}


def conn(addr, port, pid=4242):
    return Event.from_record({
        "kind": "connect", "ts": "2026-12-01T08:00:00.000000000Z", "node": "n", "agent": AGENT,
        "proc": {"pid": pid, "ppid": 1, "uid": 0, "comm": "python3", "exe": "/usr/bin/python3.11",
                 "args": ["python3", "probe.py"], "ancestry": []},
        "net": {"proto": "tcp", "family": "ipv4", "src": {"addr": "10.42.0.2", "port": 40000},
                "dst": {"addr": addr, "port": port, "scope": "internal", "name": None},
                "verdict": "allowed", "result": "refused"}})


def run(events_every_s, events):
    clock = FakeClock()
    eng = Engine(load_rules(default_rule_paths()), clock=clock)
    out = []
    for ev in events:
        out += [a.record for a in eng.process(ev)]
        clock.advance(events_every_s)
        out += [a.record for a in eng.tick()]
    out += [a.record for a in eng.flush()]
    return out


def test_forty_ports_over_sixty_seconds_is_a_slow_scan():
    alerts = run(1.5, [conn("10.77.0.5", 1000 + i) for i in range(40)])   # 40 ports, 58.5 s
    ids = [a["rule"]["id"] for a in alerts]
    assert "scan-internal-ports" not in ids          # never 30 within 10 s
    slow = [a for a in alerts if a["rule"]["id"] == "scan-internal-ports-slow"]
    assert slow and slow[0]["window"]["count"] == 40 and slow[0]["proc"]["pid"] == 4242
    assert slow[0]["rule"]["category"] == "scan" and slow[0]["agent"]["id"] == "ep-9"


def test_twenty_host_sweep_and_the_fast_scan():
    alerts = run(1.0, [conn(f"10.77.0.{10 + i}", 80) for i in range(20)])
    hosts = [a for a in alerts if a["rule"]["id"] == "scan-internal-hosts"]
    assert hosts and hosts[0]["window"]["count"] == 20
    fast = run(0.1, [conn("10.77.0.5", 2000 + i) for i in range(30)])
    assert "scan-internal-ports" in [a["rule"]["id"] for a in fast]


def test_a_busy_client_of_one_service_is_no_scan():
    alerts = run(0.5, [conn("10.30.0.9", 3141, pid=p) for p in range(200)])
    assert not [a for a in alerts if a["rule"]["category"] == "scan"]


def test_cli_listener_on_all_interfaces_is_reported(tmp_path, require_bpf):
    out = tmp_path / "events.jsonl"
    code = ("import socket\n"
            "a = socket.create_server(('127.0.0.1', 0)); b = socket.create_server(('0.0.0.0', 0))\n"
            "print(a.getsockname()[1], b.getsockname()[1])\n")
    r = subprocess.run([AGENTTRACE, "run", "--output", str(out), "--agent", _AGENT_BINDER, "--", sys.executable, "-c", code],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lo, wild = (int(x) for x in r.stdout.split())
    recs = [orjson.loads(l) for l in out.read_bytes().splitlines()]
    al = [x for x in recs if x["kind"] == "alert" and x["rule"]["id"] == "tunnel-listen-external"]
    assert [a["net"]["local"]["port"] for a in al] == [wild]
    assert al[0]["net"]["local"]["addr"] == "0.0.0.0" and al[0]["agent"]["id"] == _AGENT_BINDER
