"""`agenttrace.client`: the daemon's records, filtered on the daemon, for a training loop.

    from agenttrace.client import Client

    with Client(labels={"episode": "ep-7"}, kinds=["alert"], min_severity="high") as c:
        for rec in c:                       # blocks; reconnects when the daemon restarts
            end_episode(rec["agent"]["episode"], penalty=1.0)

    # or, between training steps, without blocking for long:
    rec = c.next(timeout=0.05)              # None when nothing arrived in time

The socket is root-only (mode 0600 and a peer-uid check), so the trainer's hook runs as
root (it also creates and labels the episode cgroups, which needs root anyway). Filters are applied by the daemon
(`agenttrace.sinks.subscription`), so a busy node does not stream every exec to each trainer.

Across reconnects no record is delivered twice: records carry the daemon run's instance
and a sequence number, the client resumes after the last one it delivered, and (in case a
daemon ever replays records it had sent before) a bounded window of content hashes of
delivered records is checked too. What cannot be replayed — records the daemon emitted
while the client was away and that left its replay buffer, or that an old daemon emitted
after the client lost it — is counted in `stats["possible_gaps"]`, not hidden.
"""
from __future__ import annotations

import collections
import hashlib
import socket
import time
from typing import Iterable, Iterator, Mapping, Optional

import orjson

from agenttrace.sinks.subscription import Subscription

DEFAULT_SOCKET = "/run/agenttrace/events.sock"


class ClientError(RuntimeError):
    """The daemon refused the subscription (the message says why), or access was denied."""


def _key(rec: dict) -> bytes:
    return hashlib.blake2b(orjson.dumps(rec, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


class Client:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, agents: Optional[Iterable[str]] = None,
                 labels: Optional[Mapping[str, str]] = None, kinds: Optional[Iterable[str]] = None,
                 min_severity: Optional[str] = None, reconnect: bool = True,
                 retry_s: float = 0.2, max_retry_s: float = 5.0, dedup_window: int = 100_000):
        self.path = socket_path
        self.subscription = Subscription.from_dict({
            k: v for k, v in {"agents": list(agents) if agents is not None else None,
                              "labels": dict(labels) if labels else None,
                              "kinds": list(kinds) if kinds is not None else None,
                              "min_severity": min_severity}.items() if v is not None})
        self.reconnect = reconnect
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.instance: Optional[str] = None      # the daemon run the cursor belongs to
        self.seq = 0                             # last seq delivered from that run
        self._sock: Optional[socket.socket] = None
        self._buf = b""
        self._ready = False                      # hello seen on the current connection
        self._seen: collections.OrderedDict = collections.OrderedDict()
        self._window = dedup_window
        self._closed = False
        self.stats = {"delivered": 0, "duplicates_skipped": 0, "connects": 0, "possible_gaps": 0}

    # -- connection --------------------------------------------------------------------
    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.path)
            req = {"subscribe": self.subscription.to_dict()}
            if self.instance is not None:
                req["resume"] = {"instance": self.instance, "seq": self.seq}
            s.sendall(orjson.dumps(req) + b"\n")
        except BaseException:
            s.close()
            raise
        self._sock, self._buf, self._ready = s, b"", False
        self.stats["connects"] += 1

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def close(self) -> None:
        self._closed = True
        self._drop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- records -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        while not self._closed:
            rec = self.next(timeout=None)
            if rec is not None:
                yield rec

    def next(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The next matching record, or None when `timeout` seconds passed without one.
        Raises ClientError when refused, ConnectionError when the daemon is gone and
        `reconnect` is off."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = self.retry_s
        while not self._closed:
            if self._sock is None:
                try:
                    self._connect()
                    wait = self.retry_s
                except PermissionError as e:
                    raise ClientError(f"{self.path}: permission denied (the event socket is root-only)") from e
                except (FileNotFoundError, ConnectionRefusedError) as e:
                    if not self.reconnect:
                        raise ConnectionError(f"{self.path}: no daemon is listening") from e
                    if deadline is not None and time.monotonic() + wait > deadline:
                        time.sleep(max(0.0, deadline - time.monotonic()))
                        return None
                    time.sleep(wait)
                    wait = min(wait * 2, self.max_retry_s)
                    continue
            rec = self._read_one(deadline)
            if rec is not None:
                return rec
            if self._sock is not None:      # timed out on a live connection
                return None
            if not self.reconnect:
                raise ConnectionError(f"{self.path}: the daemon closed the stream")
        return None

    def _read_one(self, deadline: Optional[float]) -> Optional[dict]:
        s = self._sock
        while True:
            line, nl, rest = self._buf.partition(b"\n")
            if nl:
                self._buf = rest
                rec = self._handle(line)
                if rec is not None:
                    return rec
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            s.settimeout(left)
            try:
                data = s.recv(1 << 16)
            except socket.timeout:
                return None
            except OSError:
                data = b""
            if not data:
                self._drop()                # the daemon went away: reconnect and resume
                return None
            self._buf += data

    def _handle(self, line: bytes) -> Optional[dict]:
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(msg, dict):
            return None
        if not self._ready:
            # bare records written before the daemon read our subscription: the replay
            # that follows the hello carries the ones that match
            if "error" in msg:
                self.close()
                raise ClientError(f"the daemon refused the subscription: {msg['error']}")
            if "hello" in msg:
                h = msg["hello"]
                if h.get("instance") == self.instance:
                    oldest = h.get("oldest")
                    if oldest is not None and oldest > self.seq + 1:
                        self.stats["possible_gaps"] += 1
                elif self.instance is not None:
                    self.stats["possible_gaps"] += 1   # what the old run wrote after we lost it
                    self.seq = 0
                self.instance = h.get("instance")
                self._ready = True
            return None
        seq, rec = msg.get("seq"), msg.get("record")
        if not isinstance(seq, int) or not isinstance(rec, dict):
            return None
        if seq <= self.seq:
            self.stats["duplicates_skipped"] += 1
            return None
        self.seq = seq
        k = _key(rec)
        if k in self._seen:
            self.stats["duplicates_skipped"] += 1
            return None
        self._seen[k] = None
        if len(self._seen) > self._window:
            self._seen.popitem(last=False)
        self.stats["delivered"] += 1
        return rec


def subscribe(socket_path: str = DEFAULT_SOCKET, **filters) -> Iterator[dict]:
    """Shorthand: iterate records from the daemon, reconnecting forever."""
    with Client(socket_path, **filters) as c:
        yield from c
