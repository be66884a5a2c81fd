"""Sinks: JSON lines to streams, rotated files, the root-only tail socket, syslog; bounded
queues that never block the caller."""
from __future__ import annotations

import glob
import io
import json
import os
import re
import socket
import stat
import threading

import pytest

from agenttrace.config import parse_config
from agenttrace.sinks.outputs import (Fanout, FileSink, QueuedSink, Sink, StreamSink, SyslogSink, UnixSocketSink,
                              build_sinks, dumps_line, parse_syslog_address)
from harness import stalled_client, wait_clients


def rec(i: int, pad: int = 0, **kw) -> dict:
    r = {"ts": "2026-11-27T07:00:00.123456789Z", "kind": "exec", "node": "n1",
         "agent": {"id": "a1", "cgroup": "/agents/a1", "cgroup_id": 42},
         "proc": {"pid": 100 + i, "comm": "sh", "args": ["x" * pad]}, "seq": i}
    r.update(kw)
    return r


def test_dumps_line_is_one_line_even_with_agent_newlines():
    line = dumps_line(rec(1, proc={"args": ["a\nb\r\n", "\x00"]}, raw=b"\xff\x01"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = json.loads(line)
    assert back["proc"]["args"] == ["a\nb\r\n", "\x00"]
    assert back["raw"] == "\\xff\x01"


def test_stream_sink_writes_lines_and_survives_a_closed_pipe():
    buf = io.BytesIO()
    s = StreamSink(buf, "mem")
    s.emit(rec(1))
    s.emit(rec(2))
    lines = buf.getvalue().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [1, 2]

    r, w = os.pipe()
    os.close(r)
    s2 = StreamSink(os.fdopen(w, "wb"), "pipe", close_stream=True)
    s2.emit(rec(1, pad=100000))  # EPIPE (SIGPIPE is ignored by Python)
    s2.emit(rec(2))
    assert s2.dropped >= 2
    s2.close()


def read_rotated(path: str) -> list:
    files = sorted(glob.glob(path + ".*"), key=lambda p: -int(p.rsplit(".", 1)[1])) + [path]
    out = []
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        assert data == b"" or data.endswith(b"\n"), f"{f} ends mid-line"
        out.append((f, [json.loads(line) for line in data.splitlines()]))
    return out


def test_file_rotation_under_load_loses_and_splits_nothing(tmp_path):
    path = str(tmp_path / "events.jsonl")
    max_bytes = 64 * 1024
    inner = FileSink(path, max_bytes=max_bytes, keep=10000)
    # A queue big enough that nothing is dropped: what is tested is the rotation, at full speed.
    q = QueuedSink(inner, maxsize=200000)
    n = 30000
    for i in range(n):
        q.emit(rec(i, pad=i % 97))
    q.close()
    assert q.dropped == 0
    assert inner.rotations > 10
    files = read_rotated(path)
    seqs = []
    for f, records in files:
        assert os.path.getsize(f) <= max_bytes
        seqs.extend(r["seq"] for r in records)
    # Every line, whole, once, in order across path.N … path.1, path.
    assert seqs == list(range(n))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_file_rotation_keeps_only_the_newest_n(tmp_path):
    path = str(tmp_path / "e.jsonl")
    s = FileSink(path, max_bytes=4096, keep=3)
    for i in range(2000):
        s.emit(rec(i))
    s.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["e.jsonl", "e.jsonl.1", "e.jsonl.2", "e.jsonl.3"]
    seqs = [r["seq"] for _, rs in read_rotated(path) for r in rs]
    assert seqs[-1] == 1999 and seqs == list(range(seqs[0], 2000))


def test_file_line_longer_than_max_gets_its_own_file(tmp_path):
    path = str(tmp_path / "e.jsonl")
    s = FileSink(path, max_bytes=4096, keep=5)
    s.emit(rec(0))
    s.emit(rec(1, pad=10000))
    s.emit(rec(2))
    s.close()
    got = read_rotated(path)
    assert [[r["seq"] for r in rs] for _, rs in got] == [[0], [1], [2]]


def test_file_sink_appends_to_an_existing_file_and_counts_its_size(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"x" * 4000 + b"\n")
    s = FileSink(str(path), max_bytes=4096, keep=2)
    s.emit(rec(0))
    s.close()
    assert (tmp_path / "e.jsonl.1").read_bytes() == b"x" * 4000 + b"\n"
    assert json.loads(path.read_bytes())["seq"] == 0


class Blocking(Sink):
    """An inner sink that stalls until released: a consumer that stopped reading."""

    def __init__(self):
        super().__init__("blocking")
        self.entered = threading.Event()
        self.release = threading.Event()
        self.got = []

    def emit_batch(self, records):
        self.entered.set()
        self.release.wait()
        self.got.extend(r["seq"] for r in records)


def test_queued_sink_never_blocks_and_counts_drops():
    inner = Blocking()
    q = QueuedSink(inner, maxsize=10)
    q.emit(rec(0))
    assert inner.entered.wait(30)
    # The inner sink is stuck on record 0; these return at once (a block would hang the test).
    for i in range(1, 101):
        q.emit(rec(i))
    assert q.depth == 10
    assert q.dropped == 90
    inner.release.set()
    assert q.flush(30)
    assert inner.got == list(range(0, 11))
    q.close()
    assert q.stats()["queue_dropped"] == 90


def test_queued_sink_counts_a_failing_inner_sink():
    class Broken(Sink):
        def emit_batch(self, records):
            raise RuntimeError("boom")

    q = QueuedSink(Broken("broken"))
    for i in range(5):
        q.emit(rec(i))
    q.flush(30)
    q.close()
    assert q.dropped == 5 and q.errors >= 1


def test_fanout_reports_drops_per_sink():
    blocked = Blocking()
    buf = io.BytesIO()
    f = Fanout([QueuedSink(blocked, maxsize=2), StreamSink(buf, "mem")])
    f.emit(rec(0))
    assert blocked.entered.wait(30)
    for i in range(1, 6):
        f.emit(rec(i))
    assert f.drops() == {"blocking": 3, "mem": 0}
    assert f.depths()["blocking"] == 2
    assert f.dropped == 3
    blocked.release.set()
    f.close()
    assert len(buf.getvalue().splitlines()) == 6


# --- the Unix socket `agenttrace tail` attaches to ------------------------------------------

@pytest.fixture
def sockdir():
    # pytest's tmp_path sits under a 0700 folder, which alone would keep other users out; the
    # socket's own protection is what is tested, so its folder is world-searchable.
    import shutil
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="agenttrace-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def connect(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    return c


def readlines(c: socket.socket, n: int) -> list:
    f = c.makefile("rb")
    out = [json.loads(f.readline()) for _ in range(n)]
    return out


def test_socket_is_root_only_and_streams_lines(sockdir):
    path = str(sockdir / "events.sock")
    s = UnixSocketSink(path)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        c = connect(path)
        wait_clients(s, 1)
        for i in range(3):
            s.emit(rec(i))
        assert [r["seq"] for r in readlines(c, 3)] == [0, 1, 2]
        assert s.clients()[0]["pid"] == os.getpid()
        c.close()
    finally:
        s.close()
    assert not os.path.exists(path)


def _try_connect_as_nobody(path: str) -> int:
    """Fork, drop to uid 65534, connect and read. Returns the child's verdict:
    0 refused by the socket's mode, 3 accepted then closed at once (peer-credential check),
    1 got data."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                c.connect(path)
            except PermissionError:
                code = 0
            else:
                c.settimeout(30)
                data = c.recv(100)
                code = 1 if data else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a socket another uid cannot open")
def test_non_root_user_cannot_connect(sockdir):
    path = str(sockdir / "events.sock")
    s = UnixSocketSink(path)
    try:
        assert _try_connect_as_nobody(path) == 0
        assert s.clients() == []
    finally:
        s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")
def test_peer_credentials_are_checked_even_if_the_mode_is_loosened(sockdir):
    path = str(sockdir / "events.sock")
    s = UnixSocketSink(path)
    try:
        os.chmod(path, 0o666)  # an operator's mistake; the uid check still holds
        assert _try_connect_as_nobody(path) == 3
        assert s.refused == 1
    finally:
        s.close()


def test_a_client_that_stops_reading_loses_records_without_slowing_the_others(sockdir):
    path = str(sockdir / "events.sock")
    s = UnixSocketSink(path, queue_size=50)
    stuck = stalled_client(path)
    live = connect(path)
    wait_clients(s, 2)
    f = live.makefile("rb")
    n = 3000
    try:
        for i in range(n):
            s.emit(rec(i, pad=1000))
            # The live reader keeps up record by record; the stuck one never reads.
            assert json.loads(f.readline())["seq"] == i
        per = sorted(s.clients(), key=lambda c: c["dropped"])
        assert per[0]["dropped"] == 0 and per[0]["sent"] == n
        assert per[1]["dropped"] > 0
        assert s.dropped == per[1]["dropped"]
        # What the stuck client does get is whole lines, in order, with gaps only.
        stuck.setblocking(False)
        buf = b""
        while True:
            try:
                chunk = stuck.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            buf += chunk
        lines = buf.split(b"\n")
        seqs = [json.loads(x)["seq"] for x in lines[:-1]]
        assert seqs == sorted(seqs) and seqs[0] == 0
    finally:
        live.close()
        stuck.close()
        s.close()


def test_socket_replaces_a_stale_socket_but_not_a_file(sockdir):
    path = sockdir / "events.sock"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        UnixSocketSink(str(path))
    path.unlink()
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()
    s = UnixSocketSink(str(path))
    try:
        # A live socket belongs to a running daemon: a second one must not steal it.
        with pytest.raises(FileExistsError, match="already serving"):
            UnixSocketSink(str(path))
        assert os.path.exists(path)
    finally:
        s.close()


# --- syslog ------------------------------------------------------------------------------------

RFC5424 = re.compile(rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\d+) (\S+) - (.*)$", re.S)


def test_syslog_rfc5424_over_a_unix_datagram_socket(tmp_path):
    path = str(tmp_path / "log")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(30)
    try:
        s = SyslogSink(path, facility="local0")
        s.emit(rec(1))
        alert = rec(2, kind="alert", rule={"id": "tunnel.ssh", "severity": "critical"})
        s.emit(alert)
        m1 = RFC5424.match(srv.recv(65536))
        m2 = RFC5424.match(srv.recv(65536))
        s.close()
    finally:
        srv.close()
    assert m1 and m2
    assert int(m1.group(1)) == 16 * 8 + 6  # local0.info
    assert int(m2.group(1)) == 16 * 8 + 2  # local0.crit
    assert m1.group(2) == b"2026-11-27T07:00:00.123456Z"  # at most 6 fraction digits
    assert m1.group(3) == b"n1" and m1.group(4) == b"agenttrace"
    assert int(m1.group(5)) == os.getpid()
    assert m1.group(6) == b"exec" and m2.group(6) == b"alert"
    assert json.loads(m2.group(7))["rule"]["id"] == "tunnel.ssh"


def test_syslog_over_udp_loopback_and_drops_without_listener(tmp_path):
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(30)
    port = srv.getsockname()[1]
    try:
        s = SyslogSink(f"udp://127.0.0.1:{port}", facility="daemon", hostname="h")
        s.emit(rec(1, node=None))
        m = RFC5424.match(srv.recv(65536))
        s.close()
    finally:
        srv.close()
    assert m and int(m.group(1)) == 3 * 8 + 6
    assert m.group(3) == b"h"

    gone = SyslogSink(str(tmp_path / "nobody-listens"))
    gone.emit(rec(1))
    gone.emit(rec(2))
    assert gone.dropped == 2


def test_syslog_counts_oversize_messages(tmp_path):
    path = str(tmp_path / "log")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    try:
        s = SyslogSink(path, max_message=2048)
        s.emit(rec(1, pad=5000))
        assert s.dropped == 1 and s.oversize == 1
    finally:
        srv.close()


@pytest.mark.parametrize("addr,ok", [
    ("/dev/log", True), ("udp://127.0.0.1:514", True), ("[::1]:514", True), ("127.0.0.1:514", True),
    ("tcp://127.0.0.1:6514", True), ("tcp://[::1]:514", True), ("tcp://loghost:514", False),
    ("localhost:514", False), ("udp://127.0.0.1", False), ("udp://127.0.0.1:0", False),
])
def test_syslog_address_parsing(addr, ok):
    if ok:
        parse_syslog_address(addr)
    else:
        with pytest.raises(ValueError):
            parse_syslog_address(addr)


def test_build_sinks_from_config(tmp_path, sockdir):
    cfg = parse_config(f"""
sinks:
  format: ocsf
  stdout: true
  file: {{path: {tmp_path}/ev.jsonl, max_bytes: 1MiB, keep: 2}}
  socket: {{path: {sockdir}/ev.sock}}
""")
    out = io.BytesIO()
    f = build_sinks(cfg.sinks, queue_size=100, stdout=out)
    try:
        assert sorted(f.drops()) == sorted(["stdout", f"file:{tmp_path}/ev.jsonl", f"socket:{sockdir}/ev.sock"])
        f.emit(rec(1))
    finally:
        f.close()
    # OCSF on stdout and in the file; §5 records on the socket (for tail).
    assert json.loads(out.getvalue())["class_uid"] == 1007
    assert json.loads((tmp_path / "ev.jsonl").read_bytes())["class_uid"] == 1007


def test_tail_reader_half_closes_and_still_receives(sockdir):
    from agenttrace.sinks.outputs import read_socket_records
    path = str(sockdir / "events.sock")
    s = UnixSocketSink(path)
    got = []
    it = read_socket_records(path, timeout=30)

    def reader():
        for r in it:
            got.append(r["seq"])
            if len(got) == 3:
                break
        it.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        wait_clients(s, 1)
        for i in range(3):
            s.emit(rec(i))
        t.join(60)
        assert got == [0, 1, 2]
        # The reader has gone: the next records find its socket closed and forget it.
        s.emit(rec(3))
        s.emit(rec(4))
        import time
        while s.clients():
            time.sleep(0.005)
            s.emit(rec(5))
    finally:
        s.close()


def test_queued_sink_and_fanout_take_batches(tmp_path):
    buf = io.BytesIO()
    inner = StreamSink(buf, "mem")
    q = QueuedSink(inner, maxsize=3)
    blocked = Blocking()
    qb = QueuedSink(blocked, maxsize=3)
    f = Fanout([q, qb])
    f.emit_batch([rec(0)])
    assert blocked.entered.wait(30)
    f.emit_batch([rec(i) for i in range(1, 6)])
    assert q.flush(30)
    assert qb.dropped == 2 and f.drops()["blocking"] == 2
    blocked.release.set()
    f.close()
    assert [json.loads(x)["seq"] for x in buf.getvalue().splitlines()][:1] == [0]


def test_one_unrenderable_record_is_one_drop_not_a_lost_batch(tmp_path):
    def fmt(r):
        if r["seq"] == 1:
            raise ValueError("cannot render")
        return r
    path = str(tmp_path / "e.jsonl")
    q = QueuedSink(FileSink(path, formatter=fmt))
    buf = io.BytesIO()
    qs = QueuedSink(StreamSink(buf, "mem", formatter=fmt))
    for i in range(3):
        q.emit(rec(i, extra={7: "int key"}))
        qs.emit(rec(i))
    q.close()
    qs.close()
    assert [json.loads(x)["seq"] for x in open(path, "rb")] == [0, 2]
    assert [json.loads(x)["seq"] for x in buf.getvalue().splitlines()] == [0, 2]
    assert q.dropped == 1 and qs.dropped == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_full_disk_counts_lost_lines_and_leaves_no_torn_line(tmp_path):
    import subprocess
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], check=True)
    try:
        path = str(mnt / "e.jsonl")
        s = FileSink(path, max_bytes=1 << 20, keep=2)
        s.emit_batch([rec(i, pad=700) for i in range(60)])
        s.close()
        data = open(path, "rb").read()
        assert data.endswith(b"\n")
        seqs = [json.loads(x)["seq"] for x in data.splitlines()]
        assert seqs == list(range(len(seqs))) and 0 < len(seqs) < 60
        assert s.dropped == 60 - len(seqs)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
