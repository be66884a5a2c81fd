"""A reader that stamps every line a tracer writes with the moment it arrived.

The tracer writes into a pipe (its stdout, or a FIFO given as its output file) and this thread
reads it. Arrival is taken on both clocks: wall time to compare with agenttrace's RFC 3339
`ts`, CLOCK_MONOTONIC to compare with bpftrace's `nsecs`. A pipe rather than a polled regular
file, because polling would add its own interval to every latency and burn the CPU the
tracers are being measured on."""
from __future__ import annotations

import os
import select
import threading
import time


class LineTap:
    def __init__(self, fd: int, is_event=None, keep_lines: bool = True):
        self.fd = fd
        self.is_event = is_event or (lambda line: True)
        self.keep = keep_lines
        # (arrival_wall_ns, arrival_mono_ns, line_bytes) for every complete line
        self.lines: list[tuple[int, int, bytes]] = []
        self.count = 0          # all complete lines
        self.events = 0         # lines is_event() accepts
        self.last_arrival = time.monotonic()
        self._partial = b""
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="linetap", daemon=True)
        self._thread.start()

    def _consume(self, chunk: bytes) -> None:
        wall, mono = time.time_ns(), time.monotonic_ns()
        data = self._partial + chunk
        parts = data.split(b"\n")
        self._partial = parts.pop()
        if not parts:
            return
        ev = 0
        for p in parts:
            if self.is_event(p):
                ev += 1
            if self.keep:
                self.lines.append((wall, mono, p))
        with self._cond:
            self.count += len(parts)
            self.events += ev
            self.last_arrival = time.monotonic()
            self._cond.notify_all()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not chunk:
                break
            self._consume(chunk)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until predicate(self) holds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def wait_quiet(self, quiet: float, timeout: float, at_least: int = 0, give_up_idle: float = 2.0) -> bool:
        """Wait until `at_least` events have arrived and then nothing for `quiet` seconds, or
        until nothing at all has arrived for `give_up_idle` seconds (events that were dropped
        never come; the caller counts what did)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                enough = self.events >= at_least
                idle = time.monotonic() - self.last_arrival
            if (enough and idle >= quiet) or idle >= max(give_up_idle, quiet):
                return True
            time.sleep(min(quiet / 2, 0.05))
        return False

    def close(self, drain_timeout: float = 2.0) -> None:
        """Stop after reading what is still in the pipe (the writer may be gone)."""
        end = time.monotonic() + drain_timeout
        while time.monotonic() < end and self._thread.is_alive():
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if not r:
                break
            time.sleep(0.01)  # let the reader thread take it
        self._stop.set()
        self._thread.join(timeout=2)
        if self._partial:
            self._consume(b"\n")
