"""The hot record types are read straight from the ring with struct.Struct (wire.FAST); the
ctypes mirrors stay the contract. Both decodes must agree on any bytes, at any record length."""
import ctypes as C
import random

import pytest

from agenttrace.kernel import wire as E


def _ctypes_value(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _agree(cls, names, s, raw):
    _, obj = E.decode_buf(memoryview(raw), len(raw))
    got = E.unpack(s, memoryview(raw))
    assert len(got) == len(names)
    for name, val in zip(names, got):
        want = _ctypes_value(obj, name)
        if isinstance(want, C.Array):
            want = bytes(want)
        elif isinstance(want, bytes):
            # ctypes hands a char array over up to its first NUL; the Struct, all of it
            val = val.split(b"\0", 1)[0]
        assert val == want, f"{cls.__name__}.{name}: struct {val!r} ctypes {want!r} (len {len(raw)})"


@pytest.mark.parametrize("rtype", sorted(E.FAST))
def test_struct_and_ctypes_decode_agree_on_fuzzed_records(rtype):
    cls, names, s = E.FAST[rtype]
    full = C.sizeof(cls)
    rnd = random.Random(rtype)
    for i in range(400):
        # whole records, records cut anywhere (exec: its variable argv tail), and records
        # shorter than the fields the Struct reads (zero-padded, as decode_buf pads them)
        n = full if i % 4 == 0 else rnd.randrange(2, full + 1) if i % 4 != 3 else rnd.randrange(2, s.size + 1)
        raw = bytearray(rnd.randbytes(n))
        raw[0], raw[1] = rtype & 0xFF, rtype >> 8
        if i % 8 == 1:
            # NULs inside the strings: where ctypes stops
            for k in range(0, n, 7):
                raw[k] = 0 if k > 1 else raw[k]
        _agree(cls, names, s, bytes(raw))


def test_exec_args_match_the_padded_ctypes_copy():
    rnd = random.Random(1)
    full = C.sizeof(E.Exec)
    for _ in range(300):
        size = rnd.randrange(E.ARGS_OFF - 8, full + 1)
        raw = bytearray(rnd.randbytes(size))
        raw[0], raw[1] = E.EV_EXEC, 0
        n = rnd.choice((0, 1, 5, rnd.randrange(0, E.ARGS_MAX + 1), E.ARGS_MAX, E.ARGS_MAX + 100, 0xFFFFFFFF))
        _, obj = E.decode_buf(memoryview(bytes(raw)), size)
        want = bytes(obj)[E.ARGS_OFF:E.ARGS_OFF + n]
        assert E.exec_args(memoryview(bytes(raw)), n) == want


def test_formats_follow_the_ctypes_offsets():
    # every field the Struct reads sits at its ctypes offset: packing a value at the Struct's
    # position and reading it back through ctypes names the same field
    for rtype, (cls, names, s) in E.FAST.items():
        assert s.size <= C.sizeof(cls)
        offs = {n: off for n, off, _ in E.leaves(cls)}
        assert list(names) == sorted(names, key=offs.get), f"{cls.__name__}: fields out of order"


def test_enrich_from_the_ring_equals_enrich_from_ctypes():
    # a connect, its outcome and an accept, once as the ring hands them over and once as
    # ctypes objects (tests and the fuzzer use those): the same records
    import socket
    from agenttrace.lab.fuzzing import _Env

    def records():
        lo = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1")
        c = E.Connect()
        c.h.type, c.h.tgid, c.h.pid, c.h.agent_cgroup_id, c.h.ktime, c.h.comm = E.EV_CONNECT, 1, 1, 9, 5, b"c"
        c.cookie, c.sk, c.family, c.protocol, c.dport = 77, 0xffff0001, socket.AF_INET, 6, 443
        C.memmove(C.addressof(c) + E.Connect.daddr.offset, lo, 16)
        r = E.ConnResult()
        r.h.type, r.sk, r.family, r.sport, r.result = E.EV_CONN_RESULT, 0xffff0001, socket.AF_INET, 5555, 1
        C.memmove(C.addressof(r) + E.ConnResult.saddr.offset, lo, 16)
        a = E.Listen()
        a.h.type, a.h.tgid, a.h.agent_cgroup_id, a.h.ktime = E.EV_LISTEN, 1, 9, 6
        a.cookie, a.family, a.protocol, a.lport, a.rport, a.what = 78, socket.AF_INET, 6, 443, 5555, E.LISTEN_ACCEPT
        C.memmove(C.addressof(a) + E.Listen.laddr.offset, lo, 16)
        C.memmove(C.addressof(a) + E.Listen.raddr.offset, lo, 16)
        x = E.Exit()
        x.h.type, x.h.tgid, x.h.agent_cgroup_id, x.h.ktime, x.exit_code, x.start_ktime = E.EV_EXIT, 1, 9, 9, 256, 2
        return [(E.EV_CONNECT, c), (E.EV_CONN_RESULT, r), (E.EV_LISTEN, a), (E.EV_EXIT, x)]

    def run(by_view):
        enr = _Env().enricher
        enr.clock_offset = 0
        out = []
        for rtype, o in records():
            out += enr.on_view(memoryview(bytes(o)), C.sizeof(o)) if by_view else enr(rtype, o)
        return [ev.record for ev in out]

    got, want = run(True), run(False)
    assert got == want and [r["kind"] for r in got] == ["connect", "listen", "exit"]
    assert got[0]["net"]["result"] == "established" and got[0]["net"]["src"] == {"addr": "127.0.0.1", "port": 5555}
    assert got[2]["exit_code"] == 1
