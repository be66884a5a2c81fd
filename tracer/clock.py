"""Time behind a small interface so windows, samplers and dedup can be tested without sleeping."""
from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...
    def wall_ns(self) -> int: ...


class SystemClock:
    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def wall_ns(self) -> int:
        return time.time_ns()


class FakeClock:
    """A clock that moves only when told; thread-safe."""

    def __init__(self, wall_ns: int = 1_700_000_000_000_000_000, monotonic_ns: int = 1_000_000_000):
        self._lock = threading.Lock()
        self._wall = wall_ns
        self._mono = monotonic_ns

    def monotonic_ns(self) -> int:
        with self._lock:
            return self._mono

    def wall_ns(self) -> int:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        with self._lock:
            d = int(seconds * 1e9)
            self._mono += d
            self._wall += d
