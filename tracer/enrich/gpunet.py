"""GPU + network: what a GPU-busy process, and the processes it started, reach outside.

A miner is a GPU busy for hours plus a pool connection: a long-lived, low-volume TCP session to
an external host, often stratum in clear or inside TLS on 443. A training loop is a GPU busy
plus internal traffic (its data loader, the parameter server, the object store). The process
name says nothing (a miner copied to `python3`), the combination does.

On each `gpu` record this adds `proc.egress`: the external contacts (tracer/enrich/activity.py)
of the holder and of the processes it started, each with `held` (the TCP session is
ESTABLISHED now, read from /proc/<pid>/net/tcp* for the socket inodes the process has open)
and `age_s` (how long ago it was opened), plus `proc.identity` of the holder (what its
executable is by content). The rules (rules/mining.yaml `gpu-busy-pool-traffic`,
`gpu-busy-external-connection`, `gpu-busy-non-ml-process`) decide.

`proc.egress`: {contacts: [{pid, comm, addr, port, scope, name, protocol, host, age_s, held}],
external: number of distinct external destinations, held: how many are held now}.
"""
from __future__ import annotations

import os
import socket
import struct
from typing import Dict, Set, Tuple

from agenttrace.enrich.activity import Activity

_ESTABLISHED = "01"


def _socket_inodes(pid: int) -> Set[str]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds[:4096]:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def _addr(hexaddr: str) -> str:
    """/proc/net/tcp's address column (host-order 32-bit words) as text."""
    raw = bytes.fromhex(hexaddr)
    words = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    v6 = socket.inet_ntop(socket.AF_INET6, words)
    return v6[7:] if v6.startswith("::ffff:") and "." in v6 else v6


def established(pid: int) -> Dict[Tuple[str, int], int]:
    """(remote addr, remote port) → local port of the TCP sessions `pid` holds open now."""
    inodes = _socket_inodes(pid)
    out: Dict[Tuple[str, int], int] = {}
    if not inodes:
        return out
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 10 or cols[3] != _ESTABLISHED or cols[9] not in inodes:
                        continue
                    laddr, lport = cols[1].rsplit(":", 1)
                    raddr, rport = cols[2].rsplit(":", 1)
                    try:
                        out[(_addr(raddr), int(rport, 16))] = int(lport, 16)
                    except (ValueError, OSError):
                        continue
        except OSError:
            continue
    return out


class GpuNet:
    def __init__(self, activity: Activity, identify=None):
        self.activity = activity
        self.identify = identify          # (pid, filename, exe, args) -> identity, for holders never seen exec
        self.stats = {"annotated": 0, "errors": 0}

    def annotate(self, rec: dict, pid: int, agent: int, t_ns: int) -> None:
        proc = rec.get("proc")
        if not isinstance(proc, dict) or not pid:
            return
        proc = rec["proc"] = dict(proc)       # the GPU tracker shares its proc dict between records
        ident = self.activity.identity(pid)
        if ident is None and self.identify is not None:
            try:
                ident = self.identify(pid, proc.get("exe") or "", proc.get("exe") or "", proc.get("args") or [])
            except Exception:
                ident = None
        if ident:
            proc["identity"] = ident
        contacts = []
        dests = set()
        held_n = 0
        for a in self.activity.tree(pid, agent) if agent else []:
            if not a.contacts:
                continue
            now = established(a.pid)
            for c in a.contacts:
                held = (c.addr, c.port) in now and (not c.sport or now[(c.addr, c.port)] == c.sport)
                dests.add((c.addr, c.port))
                held_n += held
                b = c.body()
                b.update(pid=a.pid, comm=a.comm, age_s=round(max(0, t_ns - c.ts_ns) / 1e9, 3),
                         held=held)
                contacts.append(b)
        proc["egress"] = {"contacts": contacts[:16], "external": len(dests), "held": held_n}
        self.stats["annotated"] += 1

