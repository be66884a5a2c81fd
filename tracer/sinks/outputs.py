"""Where records go: JSON lines to streams, rotated files, a root-only Unix socket, syslog.

Every sink implements the sink interface (docs/ARCHITECTURE.md §3) (`name`, `emit(record)`, `close()`,
`dropped`). Concrete sinks write synchronously; `QueuedSink` puts any of them on its own
thread behind a bounded queue so a slow or dead consumer costs the kernel reader one
append and, when full, one counted drop — never a wait. `Fanout` is what the pipeline holds.
"""
from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import os
import selectors
import socket
import struct
import tempfile
import threading
import time
from typing import Any, Callable, Dict, IO, Iterable, Iterator, List, Optional

import orjson

from agenttrace.sinks.render import render_lines

log = logging.getLogger(__name__)

Formatter = Callable[[dict], dict]

# Non-string keys (a counter map keyed by int) are written as strings rather than refused.
# That option halves orjson's speed (1.1 -> 2.2 us for a 1 KB exec record), and records with
# such keys are rare, so a line is first rendered without it and only those retried with it:
# for string keys both give the same bytes.
_OPTS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
_FAST_OPTS = orjson.OPT_APPEND_NEWLINE


def _default(obj: Any) -> Any:
    # Records come from decoded kernel data; a stray bytes value (a comm that is not UTF-8,
    # a raw banner) must not kill the sink, and must stay readable.
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "backslashreplace")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def dumps_line(record: dict) -> bytes:
    """One record as one JSON line, `\\n` terminated. orjson escapes control characters in
    strings, so an agent-supplied newline can never split a record across lines."""
    try:
        return orjson.dumps(record, default=_default, option=_FAST_OPTS)
    except TypeError:      # orjson.JSONEncodeError: a non-string key (or what _default refuses)
        return orjson.dumps(record, default=_default, option=_OPTS)


class Sink:
    """Base class: a name, a drop counter, and the formatter (json = identity, or OCSF)."""

    name: str = "sink"

    def __init__(self, name: str, formatter: Optional[Formatter] = None):
        self.name = name
        self.dropped = 0
        self._fmt = formatter

    def _line(self, record: dict) -> bytes:
        if self._fmt is not None:
            record = self._fmt(record)
        return dumps_line(record)

    def emit(self, record: dict) -> None:
        self.emit_batch((record,))

    def emit_batch(self, records: Iterable[dict]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"name": self.name, "dropped": self.dropped}


class StreamSink(Sink):
    """JSON lines to a binary stream (stdout under systemd goes to the journal)."""

    def __init__(self, stream: IO[bytes], name: str = "stream", formatter: Optional[Formatter] = None,
                 close_stream: bool = False):
        super().__init__(name, formatter)
        self._stream = stream
        self._close_stream = close_stream
        self._broken = False

    def emit_batch(self, records: Iterable[dict]) -> None:
        if self._broken:
            self.dropped += sum(1 for _ in records)
            return
        records = records if isinstance(records, (list, tuple)) else list(records)
        lines = None
        if self._fmt is None:
            try:     # the whole batch in one comprehension; any trouble: line by line below
                lines = render_lines(records, _default, _FAST_OPTS)
            except Exception:
                lines = None
        if lines is None:
            lines = []
            line_of = self._line
            for rec in records:
                try:
                    lines.append(line_of(rec))
                except Exception:
                    self.dropped += 1
        try:
            # one write per batch: a storm's records go out in a few large writes, not one
            # buffered-writer call (and a pipe write every 8 KiB) per record
            if lines:
                self._stream.write(b"".join(lines))
            self._stream.flush()
        except (BrokenPipeError, ValueError, OSError) as e:
            # A closed pipe (`agenttrace run | head`) stops this sink, not the tracer; the
            # batch whose write failed is counted lost (how much of it the pipe took is unknown)
            self._broken = True
            self.dropped += max(1, len(lines))
            log.warning("sink %s: output failed (%s); dropping its records from now on", self.name, e)

    def close(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass
        if self._close_stream:
            try:
                self._stream.close()
            except OSError:
                pass


class StdoutSink(StreamSink):
    def __init__(self, formatter: Optional[Formatter] = None, stream: Optional[IO[bytes]] = None):
        import sys
        super().__init__(stream if stream is not None else sys.stdout.buffer, "stdout", formatter)


class FileSink(Sink):
    """JSON lines to a file rotated by size: path → path.1 → … → path.N (N = keep).

    Rotation happens only between whole lines, on the writer's thread, so no line is split
    across files and none is lost however fast records arrive. A line longer than
    max_bytes gets a file of its own rather than being cut.
    """

    def __init__(self, path: str, max_bytes: int = 100 * 1024 * 1024, keep: int = 5,
                 formatter: Optional[Formatter] = None, mode: int = 0o600):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if keep < 1:
            raise ValueError("keep must be at least 1")
        super().__init__(f"file:{path}", formatter)
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._mode = mode
        self.rotations = 0
        self.rotate_errors = 0
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        # Events carry agents' command lines: readable by root only.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, self._mode)
        self._size = os.fstat(self._fd).st_size

    def _write(self, chunk: List[bytes]) -> None:
        # Our own batching and os.write, not a buffered file: a failed write (disk full) is
        # known at once, its lines are counted, and a torn last line is cut off again.
        if not chunk:
            return
        blob = b"".join(chunk)
        data = memoryview(blob)
        start = -1
        try:
            start = os.fstat(self._fd).st_size
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as e:
            written = len(blob) - len(data)
            whole = blob.rfind(b"\n", 0, written) + 1  # bytes up to the last complete line
            if start >= 0 and whole < written:
                try:
                    os.ftruncate(self._fd, start + whole)
                except OSError:
                    pass
            lost = blob.count(b"\n", whole)
            self.dropped += lost
            self._size -= len(blob) - whole
            log.warning("sink %s: write failed (%s): %d records lost", self.name, e, lost)

    def _rotate(self) -> None:
        try:
            for i in range(self.keep - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        except OSError as e:
            # Better an oversized file than lost events: keep writing where we are.
            self.rotate_errors += 1
            log.warning("sink %s: rotation failed: %s", self.name, e)
            self._size = 0
            return
        os.close(self._fd)
        self.rotations += 1
        self._open()

    def emit_batch(self, records: Iterable[dict]) -> None:
        with self._lock:
            chunk: List[bytes] = []
            for rec in records:
                try:
                    line = self._line(rec)
                except Exception:  # one unrenderable record, not the batch
                    self.dropped += 1
                    continue
                if self._size > 0 and self._size + len(line) > self.max_bytes:
                    self._write(chunk)
                    chunk = []
                    self._rotate()
                chunk.append(line)
                self._size += len(line)
            self._write(chunk)

    def reopen(self) -> None:
        """For SIGHUP after an external logrotate moved the file away."""
        with self._lock:
            os.close(self._fd)
            self._open()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def stats(self) -> dict:
        return {"name": self.name, "dropped": self.dropped, "rotations": self.rotations,
                "rotate_errors": self.rotate_errors}


class _Client:
    __slots__ = ("sock", "pid", "uid", "queue", "pending", "dropped", "sent", "eof", "events",
                 "sub", "inbuf", "accept_seq")

    def __init__(self, sock: socket.socket, pid: int, uid: int, accept_seq: int = 0):
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.queue: collections.deque = collections.deque()
        self.pending = b""
        self.dropped = 0
        self.sent = 0
        self.eof = False     # the client shut down its sending side; it may still read
        self.events = selectors.EVENT_READ
        self.sub = None          # a subscription.Subscription once the client sent one
        self.inbuf = b""
        self.accept_seq = accept_seq


def _peercred(sock: socket.socket) -> tuple:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)  # pid, uid, gid


class UnixSocketSink(Sink):
    """A listening SOCK_STREAM socket streaming JSON lines to every connected client.

    The socket file is mode 0600 and owned by the daemon's user (root), and each peer's
    uid is checked again with SO_PEERCRED: agents must neither read the stream nor
    connect to it. Each client has its own bounded queue; a client that stops reading
    loses records (counted on that client and in `dropped`) without slowing the others
    or the caller. Clients never write: anything they send is discarded.
    """

    def __init__(self, path: str, queue_size: int = 10000, formatter: Optional[Formatter] = None,
                 allowed_uids: Optional[Iterable[int]] = None, mode: int = 0o600,
                 replay_size: int = 4096):
        super().__init__(f"socket:{path}", formatter)
        # subscriptions (tracer/sinks/subscription.py): records are numbered per daemon run and the
        # last `replay_size` kept, so a client that reconnects misses nothing still held
        import uuid
        self.instance = uuid.uuid4().hex[:16]
        self._seq = 0
        self._ring: collections.deque = collections.deque(maxlen=max(1, replay_size))
        self.path = os.fspath(path)
        self.queue_size = queue_size
        self.allowed_uids = set(allowed_uids) if allowed_uids is not None else {os.geteuid()}
        self.refused = 0
        self._lock = threading.Lock()
        self._clients: Dict[int, _Client] = {}
        self._closed_dropped = 0
        self._stop = False
        self._listener = self._bind(mode)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name=f"agenttrace-{self.name}", daemon=True)
        self._thread.start()

    def _bind(self, mode: int) -> socket.socket:
        parent = os.path.dirname(os.path.abspath(self.path)) or "/"
        os.makedirs(parent, exist_ok=True)
        if os.path.lexists(self.path):
            # A stale socket from a previous run: replace it, but never clobber a regular file.
            import stat
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise FileExistsError(f"{self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(self.path)
            except OSError:
                pass  # nobody listens: stale, safe to replace
            else:
                raise FileExistsError(f"{self.path}: another agenttrace is already serving this socket")
            finally:
                probe.close()
            os.unlink(self.path)
        # Bind inside a private 0700 directory, fix the mode, then rename into place: there is
        # no moment at which the socket exists at `path` with looser permissions.
        tmpdir = tempfile.mkdtemp(prefix=".agenttrace-sock-", dir=parent)
        tmp = os.path.join(tmpdir, "s")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(tmp)
            os.chmod(tmp, mode)
            if os.geteuid() == 0:
                os.chown(tmp, 0, 0)
            os.rename(tmp, self.path)
        except BaseException:
            s.close()
            raise
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            os.rmdir(tmpdir)
        s.listen(16)
        s.setblocking(False)
        return s

    # -- producer side (the pipeline's thread) -------------------------------------------
    def emit_batch(self, records: Iterable[dict]) -> None:
        with self._lock:
            first = self._seq + 1
            batch = list(records)
            self._seq += len(batch)
            self._ring.extend(zip(range(first, first + len(batch)), batch))
        if not self._clients:
            return  # nobody listening: nothing to serialize, nothing dropped
        lines = []
        for seq, rec in zip(range(first, first + len(batch)), batch):
            try:
                lines.append((seq, rec, _exact(self._line(rec))))
            except Exception:  # one unrenderable record, not the batch
                self.dropped += 1
        if not lines:
            return
        wake = False
        with self._lock:
            for c in self._clients.values():
                was_empty = not c.queue and not c.pending
                for seq, rec, line in lines:
                    if c.sub is not None:
                        if not c.sub.matches(rec):
                            continue
                        line = _envelope(seq, line)
                    if len(c.queue) >= self.queue_size:
                        c.dropped += 1
                        self.dropped += 1
                    else:
                        c.queue.append(line)
                wake = wake or was_empty
        if wake:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # a wake-up is already pending

    def clients(self) -> List[dict]:
        with self._lock:
            return [{"pid": c.pid, "uid": c.uid, "queued": len(c.queue), "dropped": c.dropped,
                     "sent": c.sent} for c in self._clients.values()]

    @property
    def depth(self) -> int:
        with self._lock:
            return max((len(c.queue) for c in self._clients.values()), default=0)

    # -- the socket's own thread -----------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("sink %s: accept failed: %s", self.name, e)
                return
            try:
                pid, uid, _gid = _peercred(conn)
            except OSError:
                conn.close()
                continue
            if uid not in self.allowed_uids:
                self.refused += 1
                log.warning("sink %s: refused client pid %d uid %d", self.name, pid, uid)
                conn.close()
                continue
            conn.setblocking(False)
            with self._lock:
                seq = self._seq
            c = _Client(conn, pid, uid, seq)
            with self._lock:
                self._clients[conn.fileno()] = c
            self._sel.register(conn, selectors.EVENT_READ, c)

    def _drop_client(self, c: _Client) -> None:
        with self._lock:
            self._clients.pop(c.sock.fileno(), None)
            self._closed_dropped += c.dropped
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _flush_client(self, c: _Client) -> None:
        while True:
            if not c.pending:
                with self._lock:
                    if not c.queue:
                        break
                    # Coalesce up to ~256 KiB per send to keep syscalls few under load.
                    parts, size = [], 0
                    while c.queue and size < 262144:
                        line = c.queue.popleft()
                        parts.append(line)
                        size += len(line)
                    c.sent += len(parts)
                c.pending = b"".join(parts)
            try:
                n = c.sock.send(c.pending, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop_client(c)
                return
            c.pending = c.pending[n:]
        self._interest(c)

    def _interest(self, c: _Client) -> None:
        want = (0 if c.eof else selectors.EVENT_READ) | (selectors.EVENT_WRITE if (c.pending or c.queue) else 0)
        if want == c.events:
            return
        try:
            if c.events and want:
                self._sel.modify(c.sock, want, c)
            elif want:
                self._sel.register(c.sock, want, c)
            else:
                self._sel.unregister(c.sock)
        except (KeyError, ValueError, OSError):
            pass
        c.events = want

    def _loop(self) -> None:
        while not self._stop:
            for key, ev in self._sel.select(timeout=1.0):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    c = key.data
                    if ev & selectors.EVENT_READ:
                        try:
                            data = c.sock.recv(4096)
                        except (BlockingIOError, InterruptedError):
                            data = b"-"
                        except OSError:
                            self._drop_client(c)
                            continue
                        if not data:
                            # EOF on a reader-only client (`tail` shuts down its write side) is
                            # not a goodbye; a client that really left fails the next send.
                            c.eof = True
                            self._interest(c)
                        elif c.sub is None and data != b"-":
                            self._request(c, data)
            for c in list(self._clients.values()):
                if c.queue or c.pending:
                    self._flush_client(c)

    def _request(self, c: _Client, data: bytes) -> None:
        """A client's subscription line: from now on it gets only matching records, as
        envelopes, after what it missed that the replay buffer still holds."""
        from agenttrace.sinks.subscription import MAX_LINE, SubscriptionError, parse_request
        c.inbuf += data
        line, nl, _rest = c.inbuf.partition(b"\n")
        if not nl:
            if len(c.inbuf) > MAX_LINE:
                self._refuse(c, f"subscription line over {MAX_LINE} bytes")
            return
        try:
            sub, resume = parse_request(line)
        except SubscriptionError as e:
            self._refuse(c, str(e))
            return
        with self._lock:
            if resume and resume.get("instance") == self.instance:
                after = int(resume.get("seq", 0))
            elif resume:
                after = 0               # a new daemon run: all of it is new to this client
            else:
                after = c.accept_seq
            replay = [(seq, rec) for seq, rec in self._ring if seq > after and sub.matches(rec)]
            # what was queued bare since accept is replaced by the replay; bytes already
            # half-sent finish first so the line framing holds
            c.queue.clear()
            hello = {"hello": {"instance": self.instance, "seq": self._seq, "replayed": len(replay),
                               "oldest": self._ring[0][0] if self._ring else None}}
            c.queue.append(orjson.dumps(hello) + b"\n")
            for seq, rec in replay:
                try:
                    c.queue.append(_envelope(seq, self._line(rec)))
                except Exception:
                    self.dropped += 1
            c.sub = sub
        c.inbuf = b""

    def _refuse(self, c: _Client, why: str) -> None:
        try:
            c.sock.send(orjson.dumps({"error": why}) + b"\n", socket.MSG_NOSIGNAL)
        except OSError:
            pass
        self._drop_client(c)

    def close(self) -> None:
        if self._stop:
            return
        # Give connected clients what is already queued before closing.
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        self._thread.join(timeout=5)
        for c in list(self._clients.values()):
            try:
                c.sock.setblocking(True)
                c.sock.settimeout(1.0)
                if c.pending:
                    c.sock.sendall(c.pending)
                while c.queue:
                    c.sock.sendall(c.queue.popleft())
            except OSError:
                pass
            self._drop_client(c)
        self._sel.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def stats(self) -> dict:
        return {"name": self.name, "dropped": self.dropped, "refused": self.refused,
                "clients": self.clients()}


def _exact(line: bytes) -> bytes:
    """`line` in an allocation of its own size. orjson >= 3.12 returns its output buffer
    untrimmed (at least 4 KiB, and the power of two above the size of what it rendered: a
    1.2 KB record holds 8-16 KiB); a line that waits in a client's queue (up to queue_size of
    them per client) would hold all of that: 10,000 queued records of a stalled `tail` were
    ~160 MB instead of ~12. One copy, made only while clients are connected."""
    return bytes(memoryview(line))


def _envelope(seq: int, line: bytes) -> bytes:
    return b'{"seq":%d,"record":%s}\n' % (seq, line.rstrip(b"\n"))


# RFC 5424 §6.2.1 severities for our severities; events that are not alerts are informational.
_SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5, "info": 6}
_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20, "local5": 21,
    "local6": 22, "local7": 23,
}


def parse_syslog_target(address: str) -> tuple:
    """'/dev/log' → ('unix', AF_UNIX, '/dev/log'); 'udp://127.0.0.1:514', '127.0.0.1:514' or
    '[::1]:514' → ('udp', AF_INET/AF_INET6, (host, port)); 'tcp://IP:PORT' → ('tcp', ...).
    IP literals only: no DNS at emit time."""
    a = address
    if a.startswith("unix://"):
        a = a[len("unix://"):]
    if a.startswith("/"):
        return "unix", socket.AF_UNIX, a
    transport = "udp"
    for scheme in ("udp", "tcp"):
        if a.startswith(scheme + "://"):
            a, transport = a[len(scheme) + 3:], scheme
    if a.startswith("["):
        host, sep, port = a[1:].partition("]:")
    else:
        host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError(f"syslog address {address!r}: expected /path/to/socket, udp://IP:PORT or tcp://IP:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"syslog address {address!r}: host must be an IP address") from None
    return transport, (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (str(ip), int(port))


def parse_syslog_address(address: str) -> tuple:
    """(family, target) of a syslog address; see parse_syslog_target for the forms."""
    return parse_syslog_target(address)[1:]


class SyslogSink(Sink):
    """RFC 5424 messages to /dev/log, to UDP (one record per datagram) or to TCP (RFC 6587
    octet counting: `LEN SP MSG`, so a record may hold any byte and any length).

    PRI is facility*8 + severity, the severity taken from the alert's rule severity
    (critical→crit … info→info); MSGID is the record kind; MSG is the JSON record.
    A message the receiver cannot take (no listener, buffer full, too big, connection lost
    mid-write) is a drop, counted. A lost TCP connection is redialled on a later record, at
    most once per `retry_s`; records in between are drops.
    """

    APP_NAME = "agenttrace"

    def __init__(self, address: str = "/dev/log", facility: str = "daemon",
                 formatter: Optional[Formatter] = None, hostname: Optional[str] = None,
                 max_message: Optional[int] = None, timeout: float = 1.0, retry_s: float = 1.0):
        super().__init__(f"syslog:{address}", formatter)
        if facility not in _FACILITIES:
            raise ValueError(f"unknown syslog facility {facility!r} (one of {', '.join(_FACILITIES)})")
        self.facility = _FACILITIES[facility]
        self.transport, self.family, self.target = parse_syslog_target(address)
        self.hostname = (hostname or socket.gethostname())[:255] or "-"
        # A datagram cannot exceed 64 KiB; a stream has no such bound, rsyslog's own default
        # (maxMessageSize 8k) is the receiver's to raise.
        self.max_message = max_message if max_message is not None else \
            (1 << 20 if self.transport == "tcp" else 65000)
        self.oversize = 0
        self.sent = 0
        self.reconnects = 0
        self._timeout = timeout
        self._retry_s = retry_s
        self._next_dial = 0.0
        self._sock: Optional[socket.socket] = None
        self._procid = str(os.getpid())

    def _socket(self) -> socket.socket:
        if self._sock is None:
            if self.transport == "tcp" and time.monotonic() < self._next_dial:
                raise ConnectionRefusedError("syslog receiver down; redial later")
            kind = socket.SOCK_STREAM if self.transport == "tcp" else socket.SOCK_DGRAM
            s = socket.socket(self.family, kind | socket.SOCK_CLOEXEC)
            s.settimeout(self._timeout)
            try:
                s.connect(self.target)
            except OSError:
                s.close()
                self._next_dial = time.monotonic() + self._retry_s
                raise
            self._sock = s
            self.reconnects += 1
        return self._sock

    @staticmethod
    def _field(v: Any, limit: int) -> str:
        # Header fields are PRINTUSASCII without spaces (RFC 5424 §6); anything else → '-'.
        s = str(v or "")
        if not s or len(s) > limit or any(not (33 <= ord(ch) <= 126) for ch in s):
            return "-"
        return s

    def format(self, record: dict) -> bytes:
        sev = 6
        if record.get("kind") == "alert":
            sev = _SYSLOG_SEVERITY.get(str((record.get("rule") or {}).get("severity")), 4)
        pri = self.facility * 8 + sev
        ts = record.get("ts")
        if isinstance(ts, str) and "." in ts and ts.endswith("Z"):
            # RFC 5424 allows at most 6 fractional digits.
            base, frac = ts[:-1].split(".", 1)
            ts = f"{base}.{frac[:6]}Z"
        elif not isinstance(ts, str):
            ts = "-"
        host = self._field(record.get("node") or self.hostname, 255)
        msgid = self._field(record.get("kind"), 32)
        body = self._line(record)[:-1]
        head = f"<{pri}>1 {ts} {host} {self.APP_NAME} {self._procid} {msgid} - ".encode("ascii")
        return head + body

    def emit_batch(self, records: Iterable[dict]) -> None:
        for rec in records:
            try:
                msg = self.format(rec)
            except Exception:  # one unrenderable record, not the batch
                self.dropped += 1
                continue
            if len(msg) > self.max_message:
                self.oversize += 1
                self.dropped += 1
                continue
            try:
                if self.transport == "tcp":
                    # sendall may write part of a frame before failing: the connection is
                    # then dropped with it, so the receiver never sees a torn frame followed
                    # by a good one.
                    self._socket().sendall(b"%d " % len(msg) + msg)
                else:
                    self._socket().send(msg)
                self.sent += 1
            except (ConnectionRefusedError, FileNotFoundError) as e:
                # No listener now (rsyslog restarting): reconnect on the next record.
                self.dropped += 1
                self._reset(e)
            except OSError as e:
                self.dropped += 1
                if self.transport == "tcp" or (e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EMSGSIZE)
                                               and not isinstance(e, socket.timeout)):
                    self._reset(e)

    def _reset(self, e: Exception) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stats(self) -> dict:
        return {"name": self.name, "transport": self.transport, "sent": self.sent, "dropped": self.dropped,
                "oversize": self.oversize, "connects": self.reconnects}


class QueuedSink:
    """Runs `inner` on its own thread behind a bounded queue.

    `emit` is one length check and one append: the caller (the ring-buffer reader) never
    waits on the consumer. A full queue drops the record and counts it. `dropped` adds
    the inner sink's own drops (write errors, per-client drops of the socket sink).
    """

    def __init__(self, inner: Sink, maxsize: int = 10000, batch: int = 512):
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.inner = inner
        self.name = inner.name
        self.maxsize = maxsize
        self._batch = batch
        self._q: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.queue_dropped = 0
        self.errors = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"agenttrace-sink-{self.name}", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self.queue_dropped + self.inner.dropped

    @property
    def depth(self) -> int:
        return len(self._q)

    def emit(self, record: dict) -> None:
        if self._closing or len(self._q) >= self.maxsize:
            self.queue_dropped += 1
            return
        self._q.append(record)
        if not self._wake.is_set():
            self._wake.set()

    def emit_batch(self, records: Iterable[dict]) -> None:
        q, room = self._q, self.maxsize - len(self._q)
        n = 0
        for rec in records:
            if self._closing or n >= room:
                self.queue_dropped += 1
                continue
            q.append(rec)
            n += 1
        if n and not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        q = self._q
        while True:
            self._wake.wait()
            self._wake.clear()
            while q:
                self._idle.clear()
                batch = []
                try:
                    while len(batch) < self._batch:
                        batch.append(q.popleft())
                except IndexError:
                    pass
                try:
                    self.inner.emit_batch(batch)
                except Exception:  # one bad sink must not kill its thread silently
                    self.errors += 1
                    self.queue_dropped += len(batch)
                    log.exception("sink %s failed", self.name)
            self._idle.set()
            if self._closing and not q:
                return

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything queued so far has been handed to the inner sink."""
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._q or not self._idle.is_set():
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._wake.set()
            self._idle.wait(0.05)
        return True

    close_timeout = 10.0

    def close(self, timeout: Optional[float] = None) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(self.close_timeout if timeout is None else timeout)
        if self._thread.is_alive():
            # the consumer is stuck (a stopped terminal): what it never took is counted
            self.queue_dropped += len(self._q)
        self.inner.close()

    def stats(self) -> dict:
        s = dict(self.inner.stats())
        s.update(name=self.name, dropped=self.dropped, queue_dropped=self.queue_dropped,
                 depth=self.depth, errors=self.errors)
        return s


class FilteredSink:
    """A sink that takes only what its filter accepts (sinkfilter.RecordFilter), decided
    before its queue so what it refuses costs the queue nothing. Refused records are not
    drops: they are counted as `filtered`."""

    def __init__(self, inner: Any, accept: Callable[[dict], bool]):
        self.inner = inner
        self.accept = accept
        self.name = inner.name
        self.filtered = 0

    @property
    def dropped(self) -> int:
        return self.inner.dropped

    @property
    def depth(self) -> int:
        return int(getattr(self.inner, "depth", 0))

    def emit(self, record: dict) -> None:
        if self.accept(record):
            self.inner.emit(record)
        else:
            self.filtered += 1

    def emit_batch(self, records: Iterable[dict]) -> None:
        records = records if isinstance(records, (list, tuple)) else list(records)
        batch = [r for r in records if self.accept(r)]
        self.filtered += len(records) - len(batch)
        if batch:
            self.inner.emit_batch(batch)

    def flush(self, timeout: Optional[float] = None) -> bool:
        fl = getattr(self.inner, "flush", None)
        return fl(timeout) if fl is not None else True

    def close(self, *a, **kw) -> None:
        self.inner.close(*a, **kw)

    def stats(self) -> dict:
        st = self.inner.stats() if hasattr(self.inner, "stats") else {"name": self.name, "dropped": self.dropped}
        st = dict(st)
        st["filtered"] = self.filtered
        desc = getattr(self.accept, "describe", None)
        if desc is not None:
            st["filter"] = desc()
        return st


class Fanout:
    """Every record to every sink; per-sink drop counters for `lifecycle` stats records."""

    name = "fanout"

    def __init__(self, sinks: Iterable[Any] = ()):
        self.sinks: List[Any] = list(sinks)
        self.taps: List[Callable[[List[dict]], None]] = []
        self.errors = 0

    def add(self, sink: Any) -> None:
        self.sinks.append(sink)

    def tap(self, fn: Callable[[List[dict]], None]) -> None:
        """`fn(records)` sees every batch before the sinks do (metrics counting what is
        emitted); a tap is not a sink: no queue, no drops, no filter."""
        self.taps.append(fn)

    def _tap(self, batch: List[dict]) -> None:
        for fn in self.taps:
            try:
                fn(batch)
            except Exception:
                self.errors += 1
                log.exception("tap %s failed", fn)

    def emit(self, record: dict) -> None:
        if self.taps:
            self._tap([record])
        for s in self.sinks:
            try:
                s.emit(record)
            except Exception:
                self.errors += 1
                log.exception("sink %s failed", getattr(s, "name", s))

    def emit_batch(self, records: Iterable[dict]) -> None:
        batch = records if isinstance(records, (list, tuple)) else list(records)
        if self.taps:
            self._tap(batch)
        for s in self.sinks:
            try:
                eb = getattr(s, "emit_batch", None)
                if eb is not None:
                    eb(batch)
                else:
                    for r in batch:
                        s.emit(r)
            except Exception:
                self.errors += 1
                log.exception("sink %s failed", getattr(s, "name", s))

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.sinks)

    def drops(self) -> Dict[str, int]:
        return {s.name: s.dropped for s in self.sinks}

    def depths(self) -> Dict[str, int]:
        return {s.name: int(getattr(s, "depth", 0)) for s in self.sinks}

    def stats(self) -> List[dict]:
        return [s.stats() if hasattr(s, "stats") else {"name": s.name, "dropped": s.dropped}
                for s in self.sinks]

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception:
                log.exception("closing sink %s failed", getattr(s, "name", s))


def build_sinks(cfg: Any, queue_size: int = 10000, *, stdout: Optional[IO[bytes]] = None) -> Fanout:
    """Sinks from a `config.SinksConfig` (duck-typed), each behind its own QueuedSink, so
    serializing and writing happen off the caller's thread (the socket sink keeps, in
    addition, one queue per connected client)."""
    fmt: Optional[Formatter] = None
    if getattr(cfg, "format", "json") == "ocsf":
        from agenttrace.sinks.ocsf import to_ocsf
        fmt = to_ocsf
    qsize = queue_size
    out = Fanout()

    def add(sink: Sink, sub: Any) -> None:
        from agenttrace.sinks.filter import RecordFilter
        q = QueuedSink(sink, qsize)
        flt = RecordFilter.from_config(getattr(sub, "filter", None))
        out.add(FilteredSink(q, flt) if flt is not None and not flt.empty else q)

    so = getattr(cfg, "stdout", False)
    if so:
        add(StdoutSink(fmt, stream=stdout), so)
    f = getattr(cfg, "file", None)
    if f is not None:
        add(FileSink(f.path, f.max_bytes, f.keep, fmt), f)
    s = getattr(cfg, "socket", None)
    if s is not None:
        # `agenttrace tail` parses §5 records, so the socket always carries them, whatever
        # `format` says for the outputs bound for a SIEM.
        out.add(QueuedSink(UnixSocketSink(s.path, queue_size=qsize), qsize))
    y = getattr(cfg, "syslog", None)
    if y is not None:
        add(SyslogSink(y.address, y.facility, fmt), y)
    return out


def read_socket_records(path: str, *, timeout: Optional[float] = None) -> Iterator[dict]:
    """Records from a running daemon's UnixSocketSink, as they arrive (for `agenttrace tail`).

    Ends when the daemon closes the stream. Raises PermissionError when the caller may not
    connect (not root), ConnectionRefusedError / FileNotFoundError when nothing listens.
    A line that is not a JSON object (never written by the sink) is skipped.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(path)
        # We never send; say so, so the daemon's side sees EOF only when we go.
        s.shutdown(socket.SHUT_WR)
        f = s.makefile("rb", buffering=1 << 16)
        for line in f:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec
    finally:
        s.close()
