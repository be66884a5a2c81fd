"""The compiled build's typed ring walk, argv copy and timestamps (ringbuf.pxd, wire.pxd,
timefmt.pxd; decodecache.pxd) against the Python code they stand in for. Each module keeps its .py path as the
pure fallback and chooses the C one with its `_COMPILED` flag, so one process can run both:
setting the flag to False runs the Python lines (compiled untyped here, interpreted when
AGENTTRACE_NATIVE=0), and every answer must be the same."""
from __future__ import annotations

import ctypes as C
import datetime as dt
import os
import random
import struct

import pytest

from agenttrace.kernel import ringbuf, wire as E
from agenttrace import timefmt

NATIVE_REQUIRED = os.environ.get("AGENTTRACE_REQUIRE_NATIVE") == "1"


def test_the_typed_modules_run_compiled_when_the_build_is_required():
    from agenttrace import native
    from agenttrace.enrich import decodecache
    if not NATIVE_REQUIRED:
        pytest.skip("AGENTTRACE_REQUIRE_NATIVE is not set: the pure path may be what runs")
    loaded = set(native.status()["loaded"])
    mods = {"agenttrace.kernel.ringbuf": ringbuf, "agenttrace.kernel.wire": E,
            "agenttrace.timefmt": timefmt}
    assert set(mods) <= loaded, loaded
    assert all(m._COMPILED for m in mods.values())
    assert "agenttrace.enrich.decodecache" in loaded
    # a cdef class (a static type, not a heap type as every Python class is)
    assert not decodecache.DecodeCache.__flags__ & (1 << 9)


def test_exec_args_reads_what_the_python_path_reads(monkeypatch):
    # records cut anywhere (before, inside and past the argv), args_len up to u32's maximum
    rnd = random.Random(5)
    full = C.sizeof(E.Exec)
    cases = []
    for _ in range(300):
        size = rnd.randrange(2, full + 1)
        raw = bytes(rnd.randbytes(size))
        n = rnd.choice((0, 1, 5, rnd.randrange(0, E.ARGS_MAX + 1), E.ARGS_MAX, E.ARGS_MAX + 100, 0xFFFFFFFF))
        cases.append((raw, n))
    got = [E.exec_args(memoryview(raw), n) for raw, n in cases]
    # as the ring hands a record over: a slice of a bigger buffer
    got += [E.exec_args(memoryview(b"\xee" * 8 + raw)[8:], n) for raw, n in cases]
    monkeypatch.setattr(E, "_COMPILED", False)
    assert got == [E.exec_args(memoryview(raw), n) for raw, n in cases] * 2


def _reference_ts(t: int) -> str:
    sec, frac = divmod(t, 1_000_000_000)
    d = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=sec)
    return d.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


@pytest.mark.parametrize("compiled", [True, False], ids=["module", "python"])
def test_format_ns_across_the_i64_edges(compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(timefmt, "_COMPILED", False)
    rnd = random.Random(3)
    values = [0, -1, 1, 999_999_999, 1_000_000_000, -1_000_000_000, -1_000_000_001,
              2**63 - 1, 2**63, 2**64, -2**63, -2**63 - 1, 10**20, 1_764_633_600_123_456_789]
    values += [rnd.randrange(-2**63, 2**63) for _ in range(200)]
    values += [1_764_633_600_000_000_000 + rnd.randrange(0, 5_000_000_000) for _ in range(200)]
    for t in values:
        assert timefmt.format_ns(t) == _reference_ts(t), t
        assert timefmt.parse_ns(timefmt.format_ns(t)) == t


@pytest.mark.parametrize("native", ["1", "0"], ids=["module", "pure"])
def test_the_first_timestamp_of_a_process_is_whole(native):
    # the per-second cache holds a real second from the start, also for the one before 1970
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "AGENTTRACE_REQUIRE_NATIVE"}
    env["AGENTTRACE_NATIVE"] = native
    for first in ("-1", "-1_000_000_000"):
        out = subprocess.run([sys.executable, "-c", f"from agenttrace.timefmt import format_ns as f; print(f({first}))"],
                             capture_output=True, text=True, env=env, timeout=60, check=True).stdout.split()
        assert out == [_reference_ts(int(first.replace("_", "")))], out


class _FakeRing:
    """A ring laid out as the kernel maps it: data pages twice in a row, so a record that wraps
    past the end reads on, contiguous, from the second copy."""

    def __init__(self, size: int):
        self.size = size
        self.data = bytearray(2 * size)
        self.cons = bytearray(8)
        self.prod = bytearray(8)
        self.pos = 0

    def put(self, body: bytes, *, busy=False, discard=False) -> None:
        ln = len(body) | (ringbuf.BUSY_BIT if busy else 0) | (ringbuf.DISCARD_BIT if discard else 0)
        rec = struct.pack("=II", ln, 0) + body
        for i, b in enumerate(rec):
            off = (self.pos + i) % self.size
            self.data[off] = self.data[off + self.size] = b
        self.pos += (len(body) + ringbuf.HDR_SZ + 7) & ~7
        self.prod[:] = struct.pack("=Q", self.pos)

    def reader(self, got: list) -> ringbuf.RingReader:
        r = ringbuf.RingReader.__new__(ringbuf.RingReader)
        r.size, r.mask = self.size, self.size - 1
        r.callback = lambda view, size: got.append((bytes(view), size))
        r._cons = memoryview(self.cons).cast("Q")
        r._prod = memoryview(self.prod).cast("Q")
        r._data = memoryview(self.data)
        r._hdr = r._data.cast("I")
        r.backlog = False
        return r


def _walk(compiled: bool, monkeypatch, steps):
    """Feed a fresh ring and read it step by step: what each consume() delivered."""
    monkeypatch.setattr(ringbuf, "_COMPILED", compiled and ringbuf._COMPILED)
    ring = _FakeRing(4096)
    rnd = random.Random(11)
    out = []
    for puts, limit in steps:
        for i in range(puts):
            body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 700)))
            kind = rnd.randrange(10)
            ring.put(body, discard=kind == 0)
        got = []
        r = ring.reader(got)
        n = r.consume(limit)
        out.append((n, got, r.backlog, bytes(ring.cons)))
    # a reserved record not yet committed stops the walk; the records after it wait
    ring.put(b"x" * 40, busy=True)
    ring.put(b"y" * 40)
    got = []
    r = ring.reader(got)
    out.append((r.consume(), got, r.backlog, bytes(ring.cons)))
    return out


def test_consume_walks_a_wrapping_ring_as_the_python_path_does(monkeypatch):
    # small and large reads, a read bounded by `limit` (backlog left), many wraps of 4 KiB
    steps = [(3, 0), (5, 2), (0, 0), (9, 0), (4, 1), (0, 0)] + [(6, 0)] * 20
    got = _walk(True, monkeypatch, steps)
    want = _walk(False, monkeypatch, steps)
    assert got == want
    assert any(backlog for _, _, backlog, _ in got)            # the limit left records behind
    assert sum(n for n, *_ in got) > 50 and got[-1][0] == 0     # the busy record stopped the last read
