"""Userspace cost per record of the tracer pipeline (decode → enrich → match → summaries → JSON
sink), without the kernel: wire records built with the ctypes mirrors are fed to
`Tracer._on_view` exactly as the mmap reader hands them over, the default rule pack loaded, one
JSON sink writing to /dev/null. CPU time of this thread (time.thread_time_ns), so a neighbour on
the other core barely moves it. For quick before/after iterations on the Python side; the
figures that count are bench/cpu_per_event.py's, with real probes.

    .venv/bin/python -m bench.pipeline_micro [N] [--profile] [--fork-records] [--udp | --tcp] [--reps R]

`--udp` measures only what the zero-drop sweep's generator (`rate udp`, bench/loadgen/rate.c)
makes the probes write: one connect record per connect(2) on one UDP socket, the same socket
cookie and kernel socket address every time, by a live process the tracer never saw exec (the
generator joins the agent cgroup after its exec), no result record (UDP has none).

`--tcp` measures what the connect storm (bench/loadgen/connect_storm.c) makes the probes write,
checked against a capture of the live storm (enforce, default probe set): per connection one
connect record (a new socket cookie, the kernel socket address of the one before, freed and
reused), its outcome (established, the source port the kernel picked) and the listener
thread's accept (same process, the connect's source port as remote port); no flow record. The
storm process is live and never seen exec, as in `--udp`. Cost is per connection (3 records in,
2 out).
"""
from __future__ import annotations

import ctypes as C
import os
import socket
import sys
import time

from agenttrace.kernel import wire as E


def _hdr(h, typ, pid, agent, comm=b"true"):
    h.type, h.pid, h.tgid, h.uid = typ, pid, pid, 0
    h.ktime = time.monotonic_ns()
    h.cgroup_id = h.agent_cgroup_id = agent
    h.comm = comm


def _feed(t, recs) -> None:
    """The records to `Tracer._on_view` as the mmap reader hands them over, flushed every 64
    (the reader's batch_target), then once more."""
    for i, rec in enumerate(recs):
        t._on_view(memoryview(rec), len(rec))
        if i % 64 == 63:
            t._flush()
    t._flush()


def _records(n: int, agent: int, base_pid: int, fork_records: bool = True):
    """n exec triples (fork, exec, exit) of /bin/true by pids that no longer exist, and n
    loopback connects each with its outcome and the listener's accept. Without fork records
    (the default since schema 1.2, docs/MIGRATION.md) an exec is an exec and an exit, and the
    exec names its creator as the kernel then fills it in."""
    execs, conns = [], []
    parent = os.getpid()
    for i in range(n):
        pid = base_pid + i
        f = E.Fork()
        _hdr(f.h, E.EV_FORK, parent, agent, b"exec_storm")
        f.h.size = C.sizeof(f)
        f.child_tgid, f.parent_tgid = pid, parent
        x = E.Exec()
        _hdr(x.h, E.EV_EXEC, pid, agent)
        x.ppid = parent
        if not fork_records:
            x.creator = parent
        x.filename = b"/bin/true"
        argv = b"true\0"
        C.memmove(C.addressof(x) + E.Exec.args.offset, argv, len(argv))
        x.args_len = len(argv)
        size = C.sizeof(E.Exec) - E.ARGS_MAX + len(argv)
        x.h.size = size
        e = E.Exit()
        _hdr(e.h, E.EV_EXIT, pid, agent)
        e.h.size = C.sizeof(e)
        e.start_ktime = f.h.ktime
        execs += ([bytes(f)] if fork_records else []) + [bytes(x)[:size], bytes(e)]
    lo = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1")
    for i in range(n):
        c = E.Connect()
        _hdr(c.h, E.EV_CONNECT, parent, agent, b"connect_storm")
        c.h.size = C.sizeof(c)
        c.cookie, c.sk = 1000 + i, 0xffff000000 + (i % 64) * 4096
        c.family, c.protocol, c.dport = socket.AF_INET, 6, 40000
        C.memmove(C.addressof(c) + E.Connect.daddr.offset, lo, 16)
        r = E.ConnResult()
        _hdr(r.h, E.EV_CONN_RESULT, parent, agent, b"connect_storm")
        r.h.size = C.sizeof(r)
        r.sk, r.family, r.sport, r.dport, r.result = c.sk, socket.AF_INET, 50000 + i % 10000, 40000, E.RESULT_ESTABLISHED
        C.memmove(C.addressof(r) + E.ConnResult.saddr.offset, lo, 16)
        C.memmove(C.addressof(r) + E.ConnResult.daddr.offset, lo, 16)
        a = E.Listen()
        _hdr(a.h, E.EV_LISTEN, parent, agent, b"connect_storm")
        a.h.size = C.sizeof(a)
        a.cookie, a.family, a.protocol, a.lport, a.rport, a.what = 5000 + i, socket.AF_INET, 6, 40000, 50000, E.LISTEN_ACCEPT
        C.memmove(C.addressof(a) + E.Listen.laddr.offset, lo, 16)
        C.memmove(C.addressof(a) + E.Listen.raddr.offset, lo, 16)
        conns += [bytes(c), bytes(r), bytes(a)]
    return execs, conns


def _udp_records(n: int, agent: int, pid: int) -> list:
    """n connect records as net.c writes them for `rate udp`, checked against a capture of the
    live sweep: proto 17, op connect, verdict allowed, policy 0, one cookie and sk throughout."""
    lo = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1")
    out = []
    for _ in range(n):
        c = E.Connect()
        _hdr(c.h, E.EV_CONNECT, pid, agent, b"rate")
        c.h.size = C.sizeof(c)
        c.cookie, c.sk = 11781096, 0xffff8880_12345600
        c.family, c.protocol, c.dport = socket.AF_INET, 17, 57639
        C.memmove(C.addressof(c) + E.Connect.daddr.offset, lo, 16)
        out.append(bytes(c))
    return out


def _tcp_records(n: int, agent: int, pid: int, sport0: int = 33000) -> list:
    """n connections of the connect storm as net.c and listen.c write them (see the module doc)."""
    lo = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1")
    out = []
    sk, lport = 0xffff8880_2a4c1000, 43077
    for i in range(n):
        sport = sport0 + (i * 7) % 28000
        c = E.Connect()
        _hdr(c.h, E.EV_CONNECT, pid, agent, b"connect_storm")
        c.h.size = C.sizeof(c)
        c.cookie, c.sk = 14_000_000 + 2 * i, sk
        c.family, c.protocol, c.dport = socket.AF_INET, 6, lport
        C.memmove(C.addressof(c) + E.Connect.daddr.offset, lo, 16)
        r = E.ConnResult()
        _hdr(r.h, E.EV_CONN_RESULT, pid, agent, b"connect_storm")
        r.h.size = C.sizeof(r)
        r.sk, r.family, r.sport, r.dport, r.result = sk, socket.AF_INET, sport, lport, E.RESULT_ESTABLISHED
        C.memmove(C.addressof(r) + E.ConnResult.saddr.offset, lo, 16)
        C.memmove(C.addressof(r) + E.ConnResult.daddr.offset, lo, 16)
        a = E.Listen()
        _hdr(a.h, E.EV_LISTEN, pid, agent, b"connect_storm")
        a.h.size = C.sizeof(a)
        a.cookie, a.family, a.protocol, a.lport, a.rport = 14_000_001 + 2 * i, socket.AF_INET, 6, lport, sport
        a.what = E.LISTEN_ACCEPT
        C.memmove(C.addressof(a) + E.Listen.laddr.offset, lo, 16)
        C.memmove(C.addressof(a) + E.Listen.raddr.offset, lo, 16)
        out += [bytes(c), bytes(r), bytes(a)]
    return out


def main_udp(n: int, prof: bool, reps: int = 5, tcp: bool = False) -> int:
    from agenttrace import session
    from agenttrace.sinks.outputs import StreamSink
    opts = session.SessionOptions(cgroups=[])
    rs = session.load_ruleset(opts)
    sink = StreamSink(open(os.devnull, "wb", buffering=1 << 16), name="file", close_stream=True)
    t = session.build(opts, [sink], ruleset=rs)
    agent = os.stat("/").st_ino
    # a live process never seen exec: the table learns it from /proc once, as it learns the
    # generator (alive while the sweep's records are read)
    pid = os.getpid()
    recs = (_tcp_records if tcp else _udp_records)(n, agent, pid)
    for rec in recs[:30]:
        t._on_view(memoryview(rec), len(rec))
    t._flush()
    from agenttrace.session.heap import settle
    settle()        # as Tracer.start does: start-up's objects out of every later collection
    if prof:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
    best = []
    for rep in range(1 if prof else reps):
        c0 = time.thread_time_ns()
        _feed(t, recs)
        if tcp:      # the reader's expiry: nothing should be left held
            for ev in t.enrich.flush_pending():
                t._process(ev)
            t._flush()
        best.append((time.thread_time_ns() - c0) / n / 1000)
    if prof:
        pr.disable()
        pstats.Stats(pr).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "25")))
    what = "TCP connection (connect+result+accept)" if tcp else "UDP connect record"
    print(f"userspace pipeline: {min(best):.2f} µs per {what} (best of {len(best)}); "
          f"counts {t.counts} stage_errors {t.stage_errors}")
    return 0


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    prof = "--profile" in args
    forks = "--fork-records" in args      # the old three records per exec
    udp = "--udp" in args
    tcp = "--tcp" in args
    reps = 5
    if "--reps" in args:     # --udp/--tcp only: the best of more repetitions on a busy machine
        i = args.index("--reps")
        reps = int(args[i + 1])
        del args[i:i + 2]
    args = [a for a in args if a not in ("--profile", "--fork-records", "--udp", "--tcp")]
    n = int(args[0]) if args else 3000
    if udp or tcp:
        return main_udp(n, prof, reps, tcp)
    from agenttrace import session
    from agenttrace.sinks.outputs import StreamSink
    opts = session.SessionOptions(cgroups=[])
    rs = session.load_ruleset(opts)
    sink = StreamSink(open(os.devnull, "wb", buffering=1 << 16), name="file", close_stream=True)
    t = session.build(opts, [sink], ruleset=rs)
    agent = os.stat("/").st_ino   # any id: the agent resolver names unknown ids
    execs, conns = _records(n, agent, 3_000_000, forks)
    for rec in execs[:30]:        # warm caches, as the real driver's canary does
        t._on_view(memoryview(rec), len(rec))
    t._flush()
    if prof:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
    out = {"exec": [], "connect": []}
    for rep in range(1 if prof else 3):
        if rep:
            execs, conns = _records(n, agent, 3_000_000 + rep * n, forks)
        for name, recs, ops in (("exec", execs, n), ("connect", conns, n)):
            c0 = time.thread_time_ns()
            _feed(t, recs)
            for ev in t.enrich.flush_pending():
                t._process(ev)
            t._flush()
            out[name].append((time.thread_time_ns() - c0) / ops / 1000)
    out = {k: min(v) for k, v in out.items()}
    if prof:
        pr.disable()
        pstats.Stats(pr).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "25")))
    print(f"userspace pipeline: {out['exec']:.1f} µs per exec ({'fork+' if forks else ''}exec+exit), "
          f"{out['connect']:.1f} µs per connect (connect+result+accept); "
          f"counts {t.counts} stage_errors {t.stage_errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
