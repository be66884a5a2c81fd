"""Connect and accept records of a process share one `proc` part while its table entry is
unchanged (enrich/procshare.py): what comes out must be what building every part afresh gives,
after each thing the sharing has to notice, and the real probes' TCP storm (connect, outcome,
the listener thread's accept) must come out whole through the CLI."""
from __future__ import annotations

import ctypes as C
import io
import json
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
    """TCP connections of one process as net.c and listen.c write them for a client and its
    own listener thread (bench/loadgen/connect_storm.c), and an exec of any pid."""

    def __init__(self, pid: int, agent: int):
        self.pid, self.agent, self.kt, self.out, self.n = pid, agent, 10_000_000_000, [], 0

    def _hdr(self, h, typ, pid=None, comm=b"storm"):
        self.kt += 1000
        pid = self.pid if pid is None else pid
        h.type, h.pid, h.tgid, h.uid, h.ktime = typ, pid, pid, 0, self.kt
        h.cgroup_id = h.agent_cgroup_id = self.agent
        h.comm = comm

    def conn(self, comm=b"storm", ip="127.0.0.1", port=43077):
        self.n += 1
        sk, sport = 0xffff888000001000, 33000 + self.n
        c = E.Connect()
        self._hdr(c.h, E.EV_CONNECT, comm=comm)
        c.h.size = C.sizeof(c)
        c.cookie, c.sk, c.family, c.protocol, c.dport = 500 + 2 * self.n, sk, socket.AF_INET, 6, port
        C.memmove(C.addressof(c) + E.Connect.daddr.offset, _addr(ip), 16)
        r = E.ConnResult()
        self._hdr(r.h, E.EV_CONN_RESULT, comm=comm)
        r.h.size = C.sizeof(r)
        r.sk, r.family, r.sport, r.dport, r.result = sk, socket.AF_INET, sport, port, E.RESULT_ESTABLISHED
        C.memmove(C.addressof(r) + E.ConnResult.saddr.offset, _addr("127.0.0.1"), 16)
        C.memmove(C.addressof(r) + E.ConnResult.daddr.offset, _addr(ip), 16)
        a = E.Listen()
        self._hdr(a.h, E.EV_LISTEN, comm=comm)
        a.h.size = C.sizeof(a)
        a.cookie, a.family, a.protocol, a.lport, a.rport = 501 + 2 * self.n, socket.AF_INET, 6, port, sport
        a.what = E.LISTEN_ACCEPT
        C.memmove(C.addressof(a) + E.Listen.laddr.offset, _addr(ip), 16)
        C.memmove(C.addressof(a) + E.Listen.raddr.offset, _addr("127.0.0.1"), 16)
        self.out += [bytes(c), bytes(r), bytes(a)]

    def exec(self, filename: bytes, argv: bytes, pid=None, ppid=None):
        x = E.Exec()
        self._hdr(x.h, E.EV_EXEC, pid=pid, comm=os.path.basename(filename))
        x.ppid, x.filename = (os.getpid() if ppid is None else ppid), filename
        C.memmove(C.addressof(x) + E.Exec.args.offset, argv, len(argv))
        x.args_len = len(argv)
        x.h.size = C.sizeof(E.Exec) - E.ARGS_MAX + len(argv)
        self.out.append(bytes(x)[:x.h.size])


def _tracer(share: bool):
    from agenttrace import session
    from agenttrace.sinks.outputs import StreamSink
    opts = session.SessionOptions(cgroups=[])
    buf = io.BytesIO()
    t = session.build(opts, [StreamSink(buf, name="mem")], ruleset=session.load_ruleset(opts))
    t.node = t.enrich.node = "node-1"
    t.enrich.clock_offset = 1_780_000_000_000_000_000
    if not share:       # every part built afresh
        t.enrich.shared_procs.part = lambda tgid, uid, comm, build, gpu, ktime=0: build(tgid, uid, comm, ktime)
    return t, buf


def test_proc_fields_compared_are_the_record_fields():
    """`part` compares each field Proc.record() writes: a field added there must be added to
    the comparison, or a changed value would be handed out stale."""
    from agenttrace.enrich import procshare
    from agenttrace.enrich.proctable import Proc
    assert set(Proc(1).record()) == {"pid", *procshare.FIELDS}


def test_shared_parts_are_the_parts_built_afresh():
    """The same wire records through two pipelines, one never sharing: byte-identical output,
    with connections after each thing that changes the part (an exec of the process; each of
    its fields edited into its entry alone; an exec of its parent, which changes
    its ancestry; its pid reused by a new entry; a GPU summary), and after one that must not
    (the comm in the header, which the agent sets without an exec)."""
    child = subprocess.Popen(["sleep", "60"])       # live: the table learns it from /proc
    try:
        agent = os.stat("/").st_ino
        w = _Wire(child.pid, agent)
        marks = {}

        def mark(what):
            marks[len(w.out)] = what
        for _ in range(3):
            w.conn()
        w.exec(b"/usr/bin/python3", b"python3\0-c\0pass\0")      # new exe, args, comm, exec id
        for _ in range(2):
            w.conn()
        for what in ("ppid", "uid", "parent_exec_id", "comm", "exe", "args", "exec_id"):
            mark(what)
            for _ in range(2):
                w.conn()
        w.exec(b"/usr/bin/env", b"env\0", pid=os.getpid(), ppid=os.getppid())   # the parent's exec
        for _ in range(2):
            w.conn()
        mark("reuse")
        for _ in range(2):
            w.conn()
        mark("gpu")
        for _ in range(2):
            w.conn()
        mark("nogpu")
        for _ in range(2):
            w.conn(comm=b"renamed")
        outs, shared = [], []
        for share in (True, False):
            t, buf = _tracer(share)
            gpu = {"pct": None}
            t.enrich.gpu_summary = lambda pid: ({"sm_util_pct": gpu["pct"]} if gpu["pct"] is not None
                                                and pid == child.pid else None)
            for i, rec in enumerate(w.out):
                what = marks.get(i)
                p = t.procs.peek(child.pid)
                if what == "ppid":
                    p.ppid = 4242
                elif what == "uid":
                    p.uid = 1001
                elif what == "parent_exec_id":
                    p.parent_exec_id = "x-1-2"
                elif what in ("comm", "exe", "exec_id"):
                    setattr(p, what, getattr(p, what) + "-edited")
                elif what == "args":
                    p.args = p.args + ["edited"]
                elif what == "reuse":
                    from agenttrace.enrich.proctable import Proc
                    t.procs._put(Proc(child.pid, p.ppid, p.uid, p.comm, p.exe, p.args, start_ktime=77))
                elif what == "gpu":
                    gpu["pct"] = 91
                elif what == "nogpu":
                    gpu["pct"] = None
                t._on_view(memoryview(rec), len(rec))
                if what == "gpu":
                    gpu["pct"] = 92     # a new summary object on every call: nothing shared
            t._flush()
            for ev in t.enrich.flush_pending():
                t._process(ev)
            t._flush()
            outs.append(buf.getvalue())
            shared.append(t.enrich.shared_procs.shared)
        assert outs[0] == outs[1]
        recs = [json.loads(x) for x in outs[0].splitlines()]
        recs = [r for r in recs if r["kind"] in ("connect", "listen")]
        assert len(recs) == 2 * w.n and shared[1] == 0
        procs = [r["proc"] for r in recs]
        # each thing changed shows in the records after it (the mutations took)
        assert procs[0]["exe"] != "/usr/bin/python3" and procs[6]["exe"] == "/usr/bin/python3"
        assert procs[10]["ppid"] == 4242 and procs[14]["uid"] == 1001
        assert procs[18]["parent_exec_id"] == "x-1-2"
        for i, what in ((22, "comm"), (26, "exe"), (34, "exec_id")):
            assert procs[i][what].endswith("-edited") and not procs[i - 1][what].endswith("-edited")
        assert procs[30]["args"][-1] == "edited" and procs[29]["args"][-1] != "edited"
        assert procs[37]["ancestry"][0]["exe"] != procs[38]["ancestry"][0]["exe"]
        assert procs[41]["exec_id"] != procs[42]["exec_id"]
        assert "gpu" not in procs[45] and procs[46]["gpu"] == {"sm_util_pct": 91}
        assert all(p["comm"] == "python3-edited" for p in procs[22:])
        assert "gpu" not in procs[50] and procs[50] == procs[53]
        # shared: all but the first record after each change, and the GPU summary's 4 (a new
        # object each time): 16 built of 54
        assert shared[0] == 2 * w.n - 16, shared[0]
    finally:
        child.kill()
        child.wait()


STORM = r"""
import socket, sys, threading
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(512)
port = srv.getsockname()[1]
n = int(sys.argv[1])
def accept():
    for _ in range(n):
        c, _ = srv.accept(); c.close()
th = threading.Thread(target=accept); th.start()
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port)); s.close()
th.join()
print("done", port, flush=True)
"""


def test_tcp_storm_through_the_cli(tmp_path, agent_tree):
    """`agenttrace run --cgroup` as a user starts it: a process connecting to its own listener
    thread 100 times; every connect is established with its own source port, every accept
    names that port, and all carry the same whole proc part (the one the first record had)."""
    need_bpf()
    a = agent_tree.agent("tcp-storm")
    out = tmp_path / "run.jsonl"
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and b'"started"' in out.read_bytes() or tracer.poll() is not None)
        assert tracer.poll() is None, tracer.stderr.read()
        r = agent_tree.run(a, [PY, "-c", STORM, "100"])
        done, port = r.stdout.split()
        assert done == b"done", r.stderr
        port = int(port)

        def mine():
            recs = read_jsonl(out)
            cs = [c for c in recs if c.get("kind") == "connect" and c["net"]["dst"]["port"] == port]
            ls = [c for c in recs if c.get("kind") == "listen" and c["net"]["local"]["port"] == port
                  and c["net"]["what"] == "accept"]
            return (cs, ls) if len(cs) >= 100 and len(ls) >= 100 else None
        got = wait_until(mine)
        assert got, "connect/accept records missing"
        tracer.send_signal(signal.SIGINT)
        assert tracer.wait(timeout=60) == 0
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    cs, ls = got
    assert len(cs) == 100 and len(ls) == 100
    first = cs[0]["proc"]
    assert first["args"][:2] == [PY, "-c"] and first["ancestry"], first
    for c in cs + ls:
        assert c["proc"] == first and c["agent"]["id"] == "tcp-storm"
    assert all(c["net"]["result"] == "established" for c in cs)
    assert sorted(c["net"]["src"]["port"] for c in cs) == sorted(x["net"]["remote"]["port"] for x in ls)
    assert len({c["net"]["src"]["port"] for c in cs}) == 100
    stopped = [x for x in read_jsonl(out) if x.get("kind") == "lifecycle" and x.get("phase") == "stopped"]
    assert stopped and stopped[0]["drops"]["kernel"] == 0
    assert stopped[0]["stages"]["enrich"]["errors"] == 0


def test_a_gone_process_shares_its_part_only_for_records_from_before_its_look_up():
    """A process found nowhere (ProcTable.get's failed look-up at T): its records from before T
    with the same uid and comm share one part; a later record (maybe a new process on the pid),
    another comm, or an entry the table gained is built afresh."""
    import time

    from agenttrace.enrich.procshare import SharedProcs
    from agenttrace.enrich.proctable import ProcTable
    child = subprocess.Popen(["true"])
    child.wait()
    pid = child.pid
    t = ProcTable()
    sp = SharedProcs(t)
    built = []

    def build(tgid, uid, comm, ktime):
        built.append(ktime)
        return {"pid": tgid, "uid": uid, "comm": comm.decode(), "ancestry": t.ancestry(tgid),
                "exec_id": None if t.get(tgid, ktime) is None else "x"}
    k = time.monotonic_ns()
    first = sp.part(pid, 0, b"python3", build, None, k)     # looks, finds nothing at T > k
    assert sp.part(pid, 0, b"python3", build, None, k + 1) is first and len(built) == 1
    assert sp.shared == 1
    other = sp.part(pid, 0, b"renamed", build, None, k + 2)  # the header's comm is in the part
    assert other is not first and other["comm"] == "renamed" and len(built) == 2
    assert sp.part(pid, 0, b"python3", build, None, time.monotonic_ns()) is not first   # after T
    assert sp.part(pid, 0, b"python3", build, None, 0) is not first      # no record time
    n = len(built)
    t._put(__import__("agenttrace.enrich.proctable", fromlist=["Proc"]).Proc(pid, 1, 0, "new", "/x", []))
    assert sp.part(pid, 0, b"python3", build, None, k + 3)["exec_id"] == "x" and len(built) == n + 1
