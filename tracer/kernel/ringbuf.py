"""Reading the BPF ring buffer from Python without a callback per record.

BCC's reader (libbpf `ring_buffer__poll`) calls back into Python through a ctypes trampoline
for every record; under an exec or connect storm that trampoline was the largest single cost
of the agenttrace process (27% of its CPU, bench `--profile`). This reader maps the ring
buffer the way libbpf does and walks it in Python: one `memoryview` slice per record, no
foreign-function call, and the consumer position is published once per batch.

Layout (kernel/bpf/ringbuf.c, the same UAPI libbpf relies on): page 0 holds the consumer
position (mapped read-write), page 1 the producer position, then the data pages mapped twice
in a row so a record that wraps around the end is still contiguous. Each record starts with an
8-byte header whose first u32 is the length with two flag bits: BUSY (reserved, not yet
committed: stop here, the records after it are not ready) and DISCARD (skip). Records are
8-byte aligned.

Memory ordering: the kernel publishes the producer position and each header with release
stores; reading them with plain loads is correct on x86-64 (loads are not reordered with
other loads, stores not with earlier loads). Other architectures need acquire loads that
Python cannot express, so `supported()` says no there and the caller keeps BCC's reader.
"""
from __future__ import annotations

import mmap
import os
import platform
import select
import time
from typing import Callable

# True in the compiled build only (scripts/build_native.py; ringbuf.pxd); the deb's venv has no Cython
_COMPILED = False
try:
    import cython
    _COMPILED = cython.compiled
except ImportError:
    pass

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SZ = 8
PAGE = mmap.PAGESIZE
# one doorbell ring's bytes in its ring, header included (probes/common.h AT_BELL_SZ + 8)
BELL_RECORD = 2048
# where the late bell (probes/common.h at_doorbell_late) cuts the reader's gap: the batch wait
# before the doorbell took decisions out of it, so what it rings for is read no later than then
LATE_BELL_MS = 15
# Records a read should take before the gap stops growing (RingReader._adapt). 256, not 64:
# at 64 an exec storm's reads (~2,600 records/s) stopped growing the gap at ~25 ms, half the
# batch wait, and paid a read's cold start twice as often; at 256 they reach the batch wait.
# Sessions alternated (s37, enforce, default set, 5-7 pairs): 34 -> 24.5 us of tracer CPU per
# exec, 15.5 -> 13 per loopback connect (128: 25 per exec). What a rule may act on still rings
# a bell (probes/common.h), and a stream of 256 records or more per wakeup interval (51,200/s
# at 5 ms) is still read at that floor.
BATCH_TARGET = 256


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.environ.get("AGENTTRACE_BCC_RINGBUF") != "1"


class RingReader:
    """`poll(timeout_ms)` waits for a wakeup (or the timeout) and reads every committed record;
    `consume()` reads without waiting. `callback(view, size)` gets a memoryview of one record
    that is valid only during the call (the kernel reuses the space once the batch is done)."""

    def __init__(self, map_fd: int, size: int, callback: Callable[[memoryview, int], object]):
        if size <= 0 or size & (size - 1) or size % PAGE:
            raise ValueError(f"ring buffer size {size} is not a power-of-two multiple of the page size")
        self.size = size
        self.mask = size - 1
        self.callback = callback
        self._cons_mm = mmap.mmap(map_fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._prod_mm = mmap.mmap(map_fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
        except BaseException:
            self._cons_mm.close()
            raise
        # native-format casts read and write each position with one 8-byte access
        self._cons = memoryview(self._cons_mm)[:8].cast("Q")
        self._prod = memoryview(self._prod_mm)[:8].cast("Q")
        self._data = memoryview(self._prod_mm)[PAGE:]
        self._hdr = self._data.cast("I")
        self._ep = select.epoll()
        self._ep.register(map_fd, select.EPOLLIN)
        self.backlog = False
        # Shortest time between two reads while records keep coming (0: none). The probes wake
        # the reader at most once per interval per CPU (probes/common.h at_wake_flags), so a
        # storm on N CPUs woke it N times per interval, each read a handful of records and
        # paid the whole poll loop for them. After a read that found records the reader
        # instead sleeps out the interval and then takes everything at once; a record still
        # waits at most the interval, the bound the wakeup policy already gave.
        self.min_gap_ns = 0
        # Under a steady stream the gap grows past min_gap_ns, up to max_gap_ns, until a read
        # takes about batch_target records. Every wakeup after a sleep starts on cold caches
        # (the storm's own processes ran in between): measured ~150 us of extra Python time per
        # read, a third of the tracer's CPU per exec when an exec storm gave ~20 records per
        # 5 ms read. A read of twice the target halves the gap again and an empty one resets it,
        # so a fast stream (where latency matters most, issue 7) stays at the floor and a
        # record after a quiet spell is still read at once (its wakeup is never deferred).
        self.max_gap_ns = 0
        self.batch_target = BATCH_TARGET
        self.gap_ns = 0
        self._last_read_ns = 0
        self._last_n = 0
        self.batches = 0        # reads that found records: records / batches is the batch size
        self._bell = None       # (epoll, consumer, producer) of the doorbell ring (attach_doorbell)
        self.bell_rings = 0     # gaps cut short by the doorbell
        self._late = None       # (consumer, producer) of the late bell
        self.late_rings = 0     # gaps cut to late_gap_ns by the late bell
        self.late_gap_ns = LATE_BELL_MS * 1_000_000
        self._bell_floor_ns = 0     # shortest gap after a ring (_wait_gap): grows while rings come in a row

    def poll(self, timeout_ms: int, limit: int = 0, budget_ns: int = 0) -> int:
        if timeout_ms != 0:
            rest = self._last_read_ns + max(self.gap_ns, self.min_gap_ns) - time.monotonic_ns() if self._last_n else 0
            if rest > 0:
                t = rest / 1e9 if timeout_ms < 0 else min(rest / 1e9, timeout_ms / 1000)
                if self._bell is None:
                    time.sleep(t)
                elif not self._wait_gap(t):
                    self._bell_floor_ns = self.min_gap_ns
            else:
                self._bell_floor_ns = self.min_gap_ns
                try:
                    self._ep.poll(timeout_ms / 1000 if timeout_ms > 0 else -1, 1)
                except InterruptedError:
                    pass
        if self._bell is not None:
            # rung or not, what it says is in `events` now, read below: empty it so it can
            # wake the next gap (its poll is ready while it holds anything)
            self._bell[1][0] = self._bell[2][0]
            if self._late is not None:
                self._late[0][0] = self._late[1][0]
        n = self.consume(limit, budget_ns)
        self._last_n, self._last_read_ns = n, time.monotonic_ns()
        if n:
            self.batches += 1
        if timeout_ms != 0:     # a catch-up read in between says nothing about the stream's rate
            self._adapt(n)
        return n

    def _wait_gap(self, t: float) -> bool:
        """Sleep out the gap (t seconds) unless a bell rings (probes/common.h at_doorbell,
        at_doorbell_late); True when the doorbell cut it."""
        bell, late = self._bell, self._late
        late_ns = max(self.late_gap_ns, self.min_gap_ns)
        end = time.monotonic_ns() + int(t * 1e9)
        try:
            if not (self._bells_ep if late is not None else bell[0]).poll(t, 2):
                return False
            if late is not None and bell[2][0] == bell[1][0]:
                # only the late bell: the gap ends where the batch wait used to end, unless
                # the other one rings meanwhile
                self.late_rings += 1
                rest = min(end, self._last_read_ns + late_ns) - time.monotonic_ns()
                if rest <= 0 or not bell[0].poll(rest / 1e9, 1):
                    return False
            self.bell_rings += 1
            # A floor stays: the wakeup interval for a ring after a gap that had none, doubling
            # for each ring in a row up to late_ns. A stream of records that ring (an agent's
            # every `sh`) is then read as often as before the batch wait grew, not per record
            # nor per wakeup interval; a lone one within the wakeup interval.
            floor_ns = self._bell_floor_ns
            self._bell_floor_ns = min(late_ns, max(floor_ns, 1_000_000) * 2)
            floor = min(end, self._last_read_ns + floor_ns) - time.monotonic_ns()
            if floor > 0:
                time.sleep(floor / 1e9)
        except InterruptedError:
            pass
        return True

    def _adapt(self, n: int) -> None:
        """The next gap from the size of this read (see max_gap_ns in __init__)."""
        lo, hi = self.min_gap_ns, self.max_gap_ns
        if hi <= lo:
            self.gap_ns = lo
        elif not n:
            self.gap_ns = lo
        elif n < self.batch_target:
            self.gap_ns = min(hi, max(self.gap_ns, lo, 1_000_000) * 2)
        elif n >= 2 * self.batch_target:
            self.gap_ns = max(lo, self.gap_ns // 2)

    def consume(self, limit: int = 0, budget_ns: int = 0) -> int:
        """Read committed records: all of them, or at most `limit` records / `budget_ns` of
        time (0 = no bound). A producer that writes faster than the callback runs would
        otherwise keep this loop going forever and starve everything the caller does between
        reads (timers, drop alerts, the watchdog). `backlog` says whether records were left."""
        if _COMPILED:
            return _consume_c(self, limit, budget_ns)
        cons = self._cons[0]
        n = 0
        hdr, data, mask, cb = self._hdr, self._data, self.mask, self.callback
        deadline = time.monotonic_ns() + budget_ns if budget_ns else 0
        limit = limit or -1
        self.backlog = False
        try:
            while True:
                prod = self._prod[0]
                if cons >= prod:
                    break
                while cons < prod:
                    off = cons & mask
                    ln = hdr[off >> 2]
                    if ln & BUSY_BIT:
                        prod = -1   # not committed yet: the records after it wait too
                        break
                    size = ln & ~(BUSY_BIT | DISCARD_BIT)
                    cons += (size + HDR_SZ + 7) & ~7
                    if not ln & DISCARD_BIT:
                        n += 1
                        cb(data[off + HDR_SZ:off + HDR_SZ + size], size)
                        if n == limit or (deadline and not n & 63 and time.monotonic_ns() >= deadline):
                            prod = -2
                            break
                if prod == -1:
                    break
                self._cons[0] = cons    # publish per batch: the kernel may reuse the space
                if prod == -2:
                    self.backlog = cons < self._prod[0]
                    break
        finally:
            self._cons[0] = cons
        return n

    def attach_doorbell(self, map_fd: int, late_fd: int | None = None) -> None:
        """Wait on this ring (probes/common.h at_doorbell: records that must be read now ring it)
        during the gap instead of sleeping, and on `late_fd` (at_doorbell_late: records read at
        the latest after late_gap_ns). Only their positions are read: the records they name are
        in the main ring."""
        mms, eps = [], []
        try:
            pos = []
            for fd in (map_fd, late_fd) if late_fd is not None else (map_fd,):
                cons_mm = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
                mms.append(cons_mm)
                prod_mm = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
                mms.append(prod_mm)
                pos.append((memoryview(cons_mm)[:8].cast("Q"), memoryview(prod_mm)[:8].cast("Q")))
            ep = select.epoll()
            eps.append(ep)
            ep.register(map_fd, select.EPOLLIN)
            if late_fd is not None:
                both = select.epoll()
                eps.append(both)
                both.register(map_fd, select.EPOLLIN)
                both.register(late_fd, select.EPOLLIN)
                self._bells_ep = both
                self._late = pos[1]
                self._ep.register(late_fd, select.EPOLLIN)
        except BaseException:
            for e in eps:
                e.close()
            for v in pos:
                for m in v:
                    m.release()
            for m in mms:
                m.close()
            raise
        # also outside the gap: a record that rang may have been submitted without a wakeup of
        # `events` (probes/common.h at_wake_flags), which the wait there would sleep through
        self._ep.register(map_fd, select.EPOLLIN)
        self._bell_mms = tuple(mms)
        self._bell = (ep, pos[0][0], pos[0][1])

    @property
    def bells(self) -> int:
        """How many times the probes rang the doorbell (at most once per read: a ring holds one)."""
        return self._bell[2][0] // BELL_RECORD if self._bell is not None else 0

    @property
    def late_bells(self) -> int:
        """How many times the probes rang the late bell."""
        return self._late[1][0] // BELL_RECORD if self._late is not None else 0

    def close(self) -> None:
        self._ep.close()
        if self._bell is not None:
            ep, cons, prod = self._bell
            self._bell = None
            ep.close()
            cons.release()
            prod.release()
            if self._late is not None:
                self._bells_ep.close()
                for v in self._late:
                    v.release()
                self._late = None
            for mm in self._bell_mms:
                mm.close()
        for obj in ("_hdr", "_data", "_prod", "_cons"):
            v = getattr(self, obj, None)
            if v is not None:
                v.release()
                setattr(self, obj, None)
        for mm in (self._prod_mm, self._cons_mm):
            try:
                mm.close()
            except BufferError:
                pass    # a record view still held somewhere: the mapping goes with it


def _consume_c(r, limit, budget_ns):
    """RingReader.consume for the compiled build only (ringbuf.pxd): the same walk with the
    positions and headers as C integers, each header one load from the mapping instead of a
    memoryview item and its int object."""
    cons = r._cons[0]
    n = 0
    data, mask, cb = r._data, r.mask, r.callback
    deadline = time.monotonic_ns() + budget_ns if budget_ns else 0
    lim = limit or -1
    busy, discard, hdr_sz = BUSY_BIT, DISCARD_BIT, HDR_SZ
    r.backlog = False
    PyObject_GetBuffer(data, cython.address(buf), PyBUF_SIMPLE)
    base = cython.cast(cython.p_char, buf.buf)
    try:
        while True:
            prod = r._prod[0]
            if cons >= prod:
                break
            stop = 0
            while cons < prod:
                off = cons & mask
                ln = cython.cast(cython.p_uint, base + off)[0]
                if ln & busy:
                    stop = 1    # not committed yet: the records after it wait too
                    break
                size = ln & ~(busy | discard)
                cons += (size + hdr_sz + 7) & ~7
                if not ln & discard:
                    n += 1
                    cb(data[off + hdr_sz:off + hdr_sz + size], size)
                    if n == lim or (deadline and not n & 63 and time.monotonic_ns() >= deadline):
                        stop = 2
                        break
            if stop == 1:
                break
            r._cons[0] = cons    # publish per batch: the kernel may reuse the space
            if stop == 2:
                r.backlog = cons < r._prod[0]
                break
    finally:
        r._cons[0] = cons
        PyBuffer_Release(cython.address(buf))
    return n
