"""sd_notify messages arrive on a datagram socket the test opens, as systemd would see them."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

from agenttrace.ops.sdnotify import Notifier


def recv_fields(sock: socket.socket) -> dict:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


@pytest.fixture
def path_socket(tmp_path):
    p = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(p)
    s.settimeout(30)
    yield p, s
    s.close()


def test_ready_status_watchdog_stopping_on_a_path_socket(path_socket):
    p, s = path_socket
    n = Notifier({"NOTIFY_SOCKET": p})
    assert n.enabled
    assert n.ready("watching 2 agents")
    assert recv_fields(s) == {"READY": "1", "STATUS": "watching 2 agents"}
    assert n.watchdog()
    assert recv_fields(s) == {"WATCHDOG": "1"}
    assert n.status("reloaded rules")
    assert recv_fields(s) == {"STATUS": "reloaded rules"}
    assert n.reloading()
    f = recv_fields(s)
    assert f["RELOADING"] == "1" and int(f["MONOTONIC_USEC"]) > 0
    assert n.stopping()
    assert recv_fields(s) == {"STOPPING": "1"}
    assert n.sent == 5
    n.close()


def test_abstract_socket_name():
    name = f"agenttrace-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(30)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert recv_fields(s) == {"READY": "1"}
        n.close()
    finally:
        s.close()


def test_without_notify_socket_everything_is_a_quiet_no_op():
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False
    assert n.watchdog_interval is None


def test_missing_listener_is_counted_not_raised(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.ready() is False
    assert n.failed == 1


def test_watchdog_interval_is_half_of_watchdog_usec():
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    # Meant for another process (a child inherited the environment): not ours to answer.
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None


def test_values_with_newlines_are_refused(path_socket):
    p, _ = path_socket
    with pytest.raises(ValueError):
        Notifier({"NOTIFY_SOCKET": p}).status("two\nlines")


def test_tick_pings_every_half_timeout_by_the_clock(path_socket):
    from agenttrace.clock import FakeClock
    p, s = path_socket
    clock = FakeClock()
    n = Notifier({"NOTIFY_SOCKET": p, "WATCHDOG_USEC": "10000000"}, clock=clock)
    assert n.tick() is True            # first call pings at once
    assert recv_fields(s) == {"WATCHDOG": "1"}
    clock.advance(4.9)
    assert n.tick() is False
    clock.advance(0.1)
    assert n.tick() is True
    assert recv_fields(s) == {"WATCHDOG": "1"}
    assert Notifier({"NOTIFY_SOCKET": p}, clock=clock).tick() is False  # no watchdog configured
