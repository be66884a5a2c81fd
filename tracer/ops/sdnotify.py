"""The sd_notify protocol without libsystemd: datagrams to $NOTIFY_SOCKET.

`Type=notify` units learn readiness (READY=1), shutdown (STOPPING=1), reloads
(RELOADING=1 + MONOTONIC_USEC), liveness (WATCHDOG=1) and a status line from these
messages. Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op that returns False.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Mapping, Optional


class Notifier:
    def __init__(self, env: Optional[Mapping[str, str]] = None, clock=None):
        env = os.environ if env is None else env
        if clock is None:
            from agenttrace.clock import SystemClock
            clock = SystemClock()
        self._clock = clock
        self._last_ping_ns: Optional[int] = None
        self.address = self._address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = self._watchdog_usec(env)
        self.sent = 0
        self.failed = 0
        self._sock: Optional[socket.socket] = None

    @staticmethod
    def _address(raw: str) -> Optional[str]:
        if not raw:
            return None
        if raw.startswith("@"):
            return "\0" + raw[1:]  # abstract namespace
        if raw.startswith("/"):
            return raw
        # vsock:CID:PORT exists for VMs; not for a node daemon. Treat as absent.
        return None

    @staticmethod
    def _watchdog_usec(env: Mapping[str, str]) -> Optional[int]:
        usec = env.get("WATCHDOG_USEC")
        if not usec or not usec.isdigit() or int(usec) == 0:
            return None
        pid = env.get("WATCHDOG_PID")
        # systemd sets WATCHDOG_PID so that children which inherit the environment do not
        # answer for the main process.
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        return int(usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled advises."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def notify(self, **fields: object) -> bool:
        """Send KEY=VALUE lines, e.g. notify(READY=1, STATUS="watching 3 agents")."""
        if self.address is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items())
        if "\n" in "".join(str(v) for v in fields.values()):
            raise ValueError("sd_notify values must not contain newlines")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg.encode(), self.address)
        except OSError:
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: Optional[str] = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def reloading(self) -> bool:
        # systemd ≥ 253 (Type=notify-reload) wants MONOTONIC_USEC with RELOADING=1; older
        # versions ignore it.
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: Optional[str] = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def tick(self) -> bool:
        """Call from the loop whose liveness the watchdog should vouch for (the ring-buffer
        reader): sends WATCHDOG=1 when half the watchdog timeout has passed since the last
        ping. Cheap enough to call on every poll; True when a ping went out."""
        if self.watchdog_usec is None or self.address is None:
            return False
        now = self._clock.monotonic_ns()
        if self._last_ping_ns is not None and now - self._last_ping_ns < self.watchdog_usec * 500:
            return False
        self._last_ping_ns = now
        return self.watchdog()

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def notify(**fields: object) -> bool:
    """One-shot helper using the process environment."""
    n = Notifier()
    try:
        return n.notify(**fields)
    finally:
        n.close()
