"""Packet sockets the agents hold, found without any syscall hook: the fallback while the
`packet` probe feature (probes/packet.c) is off, which is the default, and with it on the
backstop for sockets no syscall tracepoint sees (io_uring IORING_OP_SOCKET, `int 0x80`).

Every `interval_s` the kernel's packet-socket table is read once per network namespace the
agents' processes are in (`/proc/<pid>/net/packet`, which lists that process's namespace);
only when it holds a socket not seen before are the agents' descriptor tables
(`/proc/<pid>/fd`) read to find which agent process owns it. Each socket (by inode) becomes
one `socket` record through the normal pipeline (`socket.hook: "scan"`, verdict `allowed`: it
is found after the fact, never blocked), once, so `escape-socket-fence` raises one alert, and
in enforce mode the act stage kills the process that holds it.
It costs no task on the node anything at syscall time; the price is the scan itself (a few
small /proc reads per agent process and interval) and what it cannot see, which is counted
in `lifecycle/stats` under `packet_scan`, never hidden:
  - a socket made and closed between two scans (the syscall tracepoints of `packet` see those);
  - `unmapped`: a packet socket in an agent's network namespace that no agent process holds
    (another process of a shared namespace -- the host's dhclient -- or one passed away by
    SCM_RIGHTS); counted once per socket;
  - `read_errors`: /proc entries that could not be read (a process that exited mid-scan).
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

_TYPES = {socket.SOCK_RAW: "raw", socket.SOCK_DGRAM: "dgram"}


def packet_table(pid: int) -> Dict[int, Tuple[int, int]]:
    """inode → (socket type, protocol as passed to socket(2)) of the packet sockets in the
    network namespace of `pid` (/proc/<pid>/net/packet; Proto there is ntohs of that number)."""
    out: Dict[int, Tuple[int, int]] = {}
    with open(f"/proc/{pid}/net/packet") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) < 9:
                continue
            out[int(parts[8])] = (int(parts[2]), socket.htons(int(parts[3], 16)))
    return out


def fenced_types(entries: Iterable) -> Set[int] | None:
    """The packet socket types the fence names (None: packet is not fenced at all)."""
    from agenttrace.kernel.sockfence import ANY
    types: Set[int] = set()
    for e in entries:
        if e.family == socket.AF_PACKET:
            types |= {socket.SOCK_RAW, socket.SOCK_DGRAM} if e.type == ANY else {e.type}
    return types or None


class PacketScan:
    """Owned by the Tracer while the fence names packet sockets."""

    def __init__(self, tracer, types: Set[int], interval_s: float = 2.0):
        self.tracer = tracer
        self.types = types
        self.interval_s = interval_s
        self._next = 0.0
        self._reported: Set[int] = set()
        self._unmapped: Set[int] = set()
        # (pid, type) of packet sockets the `packet` probe already reported at socket(): the
        # probe's record is the first word on them (and in enforce mode the process is dying),
        # so the scan leaves them alone; forgotten once the pid is no agent's process
        self._probe_saw: Set[Tuple[int, int]] = set()
        # reads the probe's records that came in while this scan walked /proc (the session sets
        # it): the fd is installed before the probe's sys_exit program runs, so a scan can find
        # a socket the probe is at that moment reporting, and killing the process for
        self.catch_up = None
        self.stats = {"scans": 0, "sockets": 0, "unmapped": 0, "read_errors": 0}

    def _agent_pids(self) -> Dict[int, int]:
        """pid → agent cgroup id, over every watched subtree."""
        from agenttrace.enrich.cgroups import procs
        out: Dict[int, int] = {}
        for root_id, root in self.tracer.agents.watched().items():
            for pid in procs(root, recursive=False):
                out[pid] = root_id
            try:
                children = [p for p in Path(root).iterdir() if p.is_dir()]
            except OSError:
                continue
            for child in children:
                try:
                    cid = os.stat(child).st_ino
                except OSError:
                    continue
                for pid in procs(child):
                    out[pid] = cid
        return out

    def tick(self, now: float | None = None) -> List:
        now = time.monotonic() if now is None else now
        if now < self._next:
            return []
        self._next = now + self.interval_s
        self.stats["scans"] += 1
        pids = self._agent_pids()
        if self._probe_saw:
            self._probe_saw = {k for k in self._probe_saw if k[0] in pids}
        if not pids:
            return []
        table: Dict[int, Tuple[int, int]] = {}
        seen_ns: Set[int] = set()
        for pid in pids:
            try:
                ns = os.stat(f"/proc/{pid}/ns/net").st_ino
                if ns in seen_ns:
                    continue
                table.update(packet_table(pid))
                seen_ns.add(ns)
            except (OSError, ValueError):
                self.stats["read_errors"] += 1
        # forget sockets that are gone: an inode may be reused by a later socket
        self._reported &= table.keys()
        self._unmapped &= table.keys()
        new = {ino: v for ino, v in table.items()
               if v[0] in self.types and ino not in self._reported and ino not in self._unmapped}
        if not new:
            return []
        owners: Dict[int, int] = {}
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                self.stats["read_errors"] += 1
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:[") and int(target[8:-1]) in new:
                    owners.setdefault(int(target[8:-1]), pid)
        if self.catch_up is not None and owners:
            self.catch_up()
        events = []
        for ino, (typ, proto) in new.items():
            pid = owners.get(ino)
            if pid is None:
                self._unmapped.add(ino)
                self.stats["unmapped"] += 1
                continue
            if (pid, typ) in self._probe_saw:
                self._reported.add(ino)        # the probe's record covers it
                continue
            self._reported.add(ino)
            self.stats["sockets"] += 1
            events.append(self._event(pid, pids[pid], ino, typ, proto))
        return events

    def probe_saw(self, pid: int, family: int, typ: int) -> None:
        """The `packet` probe reported a socket of this process at socket() (Enricher hook)."""
        if family == socket.AF_PACKET:
            self._probe_saw.add((pid, typ))
            if len(self._probe_saw) > 65536:
                self._probe_saw.clear()        # bounded; at worst a socket is reported twice

    def _event(self, pid: int, agent_cid: int, ino: int, typ: int, proto: int):
        from agenttrace.session.event import Event
        from agenttrace.timefmt import format_ns
        tr = self.tracer
        t = time.time_ns()
        p = tr.procs.get(pid)
        proc = p.record() if p is not None else {"pid": pid, "ppid": 0, "uid": _uid(pid), "comm": "",
                                                "exe": "", "args": []}
        proc["ancestry"] = tr.procs.ancestry(pid)
        rec = {"ts": format_ns(t), "kind": "socket", "node": tr.node, "agent": tr.agents.agent(agent_cid),
               "proc": proc,
               "socket": {"family": "packet", "type": _TYPES.get(typ, str(typ)), "protocol": str(proto),
                          "verdict": "allowed", "fenced": True, "hook": "scan", "inode": ino}}
        return Event("socket", t, rec, pid, agent_cid)


def _uid(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return 0
