"""A connect record that repeats the previous one but for its time is built from that record's
parts (Enricher._connect_repeat): what comes out must be what building it afresh gives, for
every change the repeat has to notice, and the real probes' repeats (one UDP socket connected
again and again, as the bench's rate generator does) must arrive whole and counted."""
from __future__ import annotations

import ctypes as C
import io
import os
import signal
import socket
import subprocess
import sys

from conftest import AGENTTRACE, need_bpf
from harness import read_jsonl, wait_until

from agenttrace.kernel import wire as E

PY = sys.executable


def _addr(ip: str) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(ip)


class _Wire:
    def __init__(self, pid: int, agent: int):
        self.pid, self.agent, self.kt, self.out = pid, agent, 10_000_000_000, []

    def _hdr(self, h, typ, comm=b"python3"):
        self.kt += 1000
        h.type, h.pid, h.tgid, h.uid, h.ktime = typ, self.pid, self.pid, 0, self.kt
        h.cgroup_id = h.agent_cgroup_id = self.agent
        h.comm = comm

    def connect(self, ip="127.0.0.1", port=9, proto=17, cookie=77, sk=0xffff888000001000, verdict=0,
                policy_id=0, comm=b"python3"):
        c = E.Connect()
        self._hdr(c.h, E.EV_CONNECT, comm)
        c.h.size = C.sizeof(c)
        c.cookie, c.sk, c.family, c.protocol, c.dport = cookie, sk, socket.AF_INET, proto, port
        c.verdict, c.policy_id = verdict, policy_id
        C.memmove(C.addressof(c) + E.Connect.daddr.offset, _addr(ip), 16)
        self.out.append(bytes(c))

    def result(self, sk, port):
        r = E.ConnResult()
        self._hdr(r.h, E.EV_CONN_RESULT)
        r.h.size = C.sizeof(r)
        r.sk, r.family, r.sport, r.dport, r.result = sk, socket.AF_INET, 40000, port, E.RESULT_ESTABLISHED
        C.memmove(C.addressof(r) + E.ConnResult.saddr.offset, _addr("127.0.0.1"), 16)
        C.memmove(C.addressof(r) + E.ConnResult.daddr.offset, _addr("127.0.0.1"), 16)
        self.out.append(bytes(r))

    def exec(self, filename: bytes, comm: bytes):
        x = E.Exec()
        self._hdr(x.h, E.EV_EXEC, comm)
        x.ppid, x.filename = os.getpid(), filename
        argv = comm + b"\0"
        C.memmove(C.addressof(x) + E.Exec.args.offset, argv, len(argv))
        x.args_len = len(argv)
        x.h.size = C.sizeof(E.Exec) - E.ARGS_MAX + len(argv)
        self.out.append(bytes(x)[:x.h.size])


def _tracer(repeat: bool):
    from agenttrace import session
    from agenttrace.sinks.outputs import StreamSink
    opts = session.SessionOptions(cgroups=[])
    buf = io.BytesIO()
    t = session.build(opts, [StreamSink(buf, name="mem")], ruleset=session.load_ruleset(opts))
    t.node = t.enrich.node = "node-1"
    if not repeat:
        t.enrich._connect_repeat = lambda m, f: None     # every record built afresh
    return t, buf


def test_repeats_are_the_records_built_afresh():
    """The same wire records through two pipelines, one never taking the repeat: byte-identical
    output, with a repeat after each thing that changes a record (an exec of the process, a DNS
    name learned for the address, new policy names, a TCP connect in between)."""
    # a live process the tables learn from /proc, as the sweep's generator (never seen exec)
    child = subprocess.Popen(["sleep", "60"])
    try:
        agent = os.stat("/").st_ino
        w = _Wire(child.pid, agent)
        for _ in range(5):
            w.connect()
        w.exec(b"/usr/bin/python3", b"python3")          # a new image: its exe and args change
        for _ in range(3):
            w.connect()
        marks = {len(w.out): "dns"}                      # a name learned between two records
        for _ in range(3):
            w.connect()
        marks[len(w.out)] = "policy"                     # a reload's new policy names
        for _ in range(3):
            w.connect(policy_id=4)
        w.connect(proto=6, cookie=78, sk=0xffff888000002000, port=8080)   # TCP: held for its result
        w.result(0xffff888000002000, 8080)
        for _ in range(3):
            w.connect()
        for _ in range(3):
            w.connect(ip="10.1.2.3", port=53, verdict=E.VERDICT_BLOCKED, policy_id=4)
        outs, repeats = [], []
        for repeat in (True, False):
            t, buf = _tracer(repeat)
            t.enrich.clock_offset = 1_780_000_000_000_000_000
            for i, rec in enumerate(w.out):
                what = marks.get(i)
                if what == "dns":
                    t.enrich.names.add(agent, "127.0.0.1", "echo.example", 300)
                elif what == "policy":
                    t.enrich.policy_rule = lambda pid: f"rule-{pid}"
                t._on_view(memoryview(rec), len(rec))
            t._flush()
            for ev in t.enrich.flush_pending():
                t._process(ev)
            t._flush()
            outs.append(buf.getvalue())
            repeats.append(t.counters()["stages"]["enrich"]["connect_repeats"])
        lines = outs[0].splitlines()
        assert outs[0] == outs[1]
        assert len(lines) == 22 and repeats[1] == 0
        # 4 + 2 + 2 + 2 + 2 + 2 repeats: each run's first record is built, the rest repeat it
        assert repeats[0] == 14
        import json
        recs = [json.loads(x) for x in lines]
        assert recs[0]["proc"]["exe"] != "/usr/bin/python3" and recs[5]["proc"]["exe"] == "/usr/bin/python3"
        assert recs[8]["net"]["dst"]["name"] is None and recs[9]["net"]["dst"]["name"] == "echo.example"
        assert "policy_rule" not in recs[11]["net"] and recs[12]["net"]["policy_rule"] == "rule-4"
        assert recs[15]["net"]["result"] == "established" and recs[21]["net"]["verdict"] == "blocked"
    finally:
        child.kill()
        child.wait()


UDP_LOOP = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[1])):
    u.connect(("127.0.0.1", 9))     # UDP: no packet, one connect record each
print("done", flush=True)
"""


def test_udp_connect_storm_through_the_cli(tmp_path, agent_tree):
    """`agenttrace run --cgroup` as a user starts it: every one of 300 connects on one UDP
    socket is a whole record of its process, all alike but for the time, in order, and the
    stopped record counts the repeats."""
    need_bpf()
    a = agent_tree.agent("udp-storm")
    out = tmp_path / "run.jsonl"
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and b'"started"' in out.read_bytes() or tracer.poll() is not None)
        assert tracer.poll() is None, tracer.stderr.read()
        r = agent_tree.run(a, [PY, "-c", UDP_LOOP, "300"])
        assert r.stdout.strip() == b"done", r.stderr

        def mine():
            return [c for c in read_jsonl(out) if c.get("kind") == "connect" and c["net"]["dst"]["port"] == 9]
        got = wait_until(lambda: (lambda cs: cs if len(cs) >= 300 else None)(mine()))
        assert got and len(got) == 300, len(mine())
        tracer.send_signal(signal.SIGINT)
        assert tracer.wait(timeout=60) == 0
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    first = dict(got[0], ts=None, schema_version=None)
    assert first["proc"]["exe"].startswith("/usr/bin/python3") or first["proc"]["exe"] == PY
    assert first["proc"]["args"][:2] == [PY, "-c"] and first["agent"]["id"] == "udp-storm"
    assert first["net"] == {"proto": "udp", "family": "ipv4", "op": "connect", "src": None,
                            "dst": {"addr": "127.0.0.1", "port": 9, "scope": "loopback", "name": None},
                            "verdict": "allowed", "result": "sent", "policy_rule": None}
    for c in got[1:]:
        assert dict(c, ts=None, schema_version=None) == first
    assert [c["ts"] for c in got] == sorted(c["ts"] for c in got)
    stopped = [x for x in read_jsonl(out) if x.get("kind") == "lifecycle" and x.get("phase") == "stopped"]
    assert stopped, "no stopped record"
    st = stopped[0]["stages"]
    assert st["enrich"]["errors"] == 0 and stopped[0]["drops"]["kernel"] == 0
    # each connect after the first repeats the one before, unless another record of the
    # process came in between
    assert st["enrich"]["connect_repeats"] >= 250, st


def test_a_held_connect_is_released_with_the_outcome_already_in_the_ring():
    """The hold ran out while the reader was off the CPU, the outcome already written: poll
    reads the ring before it lets a connect go "pending" (pipeline.poll, Enricher.pending_due).
    A connect that does go without its outcome is still a contact for the look-back memory.
    Synthetic wire records through the real pipeline (the race cannot be forced with live
    probes); the reader's read is the one stand-in."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        agent = os.stat("/").st_ino
        w = _Wire(child.pid, agent)
        w.connect(ip="198.51.100.7", port=443, proto=6, cookie=90, sk=0xffff888000009000)
        w.result(0xffff888000009000, 443)
        w.connect(ip="198.51.100.8", port=443, proto=6, cookie=91, sk=0xffff88800000a000)
        t, buf = _tracer(True)
        t.opts.wakeup_ms = 0
        ring = [w.out[1]]                    # written while the reader was away

        def read(wait_ms, bounded=True):
            while ring:
                rec = ring.pop(0)
                t._on_view(memoryview(rec), len(rec))
        t._read = read
        for rec in (w.out[0], w.out[2]):
            t._on_view(memoryview(rec), len(rec))
        hold = t.opts.connect_hold_ms * 1_000_000
        # both held past the hold: the first one's outcome is in the ring, the second has none
        t.enrich.pending = {k: (ev, since - 2 * hold, sk) for k, (ev, since, sk) in t.enrich.pending.items()}
        t.poll(0)
        t._flush()
        import json
        got = {r["net"]["dst"]["addr"]: r["net"]["result"] for r in map(json.loads, buf.getvalue().splitlines())
               if r.get("kind") == "connect"}
        assert got == {"198.51.100.7": "established", "198.51.100.8": "pending"}
        assert not t.enrich.pending
        actor = t.enrich.activity.procs.get(child.pid)
        assert actor is not None and {c.addr for c in actor.contacts} == {"198.51.100.7", "198.51.100.8"}
    finally:
        child.kill()
        child.wait()
