"""Connections the agents already had when tracing started, from the kernel's socket table
(sock_diag over netlink, pyroute2's DiagSocket): a tunnel opened while the daemon was down,
or before `run --cgroup` attached, would otherwise never be seen — its connect() happened
before the probes.

Each established TCP socket whose cgroup (INET_DIAG_CGROUP_ID: the cgroup that created it)
lies under a watched cgroup becomes one record through the normal pipeline (enrich, rules,
sinks): `connect` with `net.op: "inventory"` and `result: "established"`, or, for a socket
accepted on one of the agent's listening ports, `listen` with `what: "accept"` and
`op: "inventory"`. The owning process is found by its socket inode under /proc/<pid>/fd of
that cgroup's processes (pid 0 when it was passed elsewhere or has gone). `net.cookie` is the
socket cookie, the same value the network probes see for later traffic on that socket.

Only the tracer's own network namespace is listed: agents in other network namespaces
(containers with their own netns) are not inventoried.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

log = logging.getLogger("agenttrace")

TCP_ESTABLISHED = 1
TCP_LISTEN = 10


def _cgroup_map(watched: Dict[int, Path]) -> Dict[int, int]:
    """cgroup id (directory inode) of every cgroup under a watched one → its agent cgroup id
    (the direct child of the watched cgroup it lies in, or the watched cgroup itself)."""
    out: Dict[int, int] = {}
    for root_id, root in watched.items():
        out[root_id] = root_id
        for dirpath, dirnames, _files in os.walk(root):
            here = Path(dirpath)
            if here == root:
                continue
            rel = here.relative_to(root)
            try:
                agent_id = os.stat(root / rel.parts[0]).st_ino
                out[os.stat(here).st_ino] = agent_id
            except OSError:
                continue
    return out


def _socket_owners(cgroup_dirs: List[Path]) -> Dict[int, int]:
    """socket inode → pid, over the processes of these cgroups."""
    from agenttrace.enrich.cgroups import procs
    owners: Dict[int, int] = {}
    for d in cgroup_dirs:
        for pid in procs(d, recursive=False):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owners.setdefault(int(target[8:-1]), pid)
    return owners


def established(watched: Dict[int, Path]) -> Iterator[dict]:
    """The established TCP sockets of watched cgroups: dicts with family, src, dst, cookie,
    inode, uid, agent_cgroup_id, pid, inbound."""
    from pyroute2 import DiagSocket
    cgmap = _cgroup_map(watched)
    if not cgmap:
        return
    found: List[Tuple[int, dict]] = []
    listening: set = set()
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ds.get_sock_stats(family=family, states=(1 << TCP_ESTABLISHED) | (1 << TCP_LISTEN)):
                cg = msg.get_attr("INET_DIAG_CGROUP_ID")
                if msg["idiag_state"] == TCP_LISTEN:
                    listening.add((family, msg["idiag_sport"]))
                    continue
                if cg is None or cg not in cgmap:
                    continue
                found.append((cg, {"family": "ipv6" if family == socket.AF_INET6 else "ipv4",
                                   "src": {"addr": msg["idiag_src"], "port": msg["idiag_sport"]},
                                   "dst": {"addr": msg["idiag_dst"], "port": msg["idiag_dport"]},
                                   "cookie": msg["idiag_cookie"], "inode": msg["idiag_inode"],
                                   "uid": msg["idiag_uid"], "agent_cgroup_id": cgmap[cg],
                                   "_fam": family}))
    if not found:
        return
    # the cgroup directories the sockets were made in, to look for their owners
    by_id: Dict[int, Path] = {}
    for root in watched.values():
        for dirpath, _d, _f in os.walk(root):
            try:
                by_id[os.stat(dirpath).st_ino] = Path(dirpath)
            except OSError:
                pass
    owners = _socket_owners([by_id[c] for c in {c for c, _ in found} if c in by_id])
    for _cg, s in found:
        s["pid"] = owners.get(s["inode"], 0)
        s["inbound"] = (s.pop("_fam"), s["src"]["port"]) in listening
        yield s


def inventory(tracer) -> int:
    """Put the agents' already-established connections through the tracer's pipeline as
    records. Returns how many; never raises (a failed inventory is logged and counted)."""
    from agenttrace.session.event import Event
    from agenttrace.timefmt import format_ns
    try:
        socks = list(established(tracer.agents.watched()))
    except Exception as e:
        log.warning("agenttrace: connection inventory failed (sock_diag: %s)", e)
        tracer.stage_errors += 1
        return 0
    n = 0
    for s in socks:
        t = time.time_ns()
        agent_cid = s["agent_cgroup_id"]
        pid = s["pid"]
        p = tracer.procs.get(pid) if pid else None
        proc = p.record() if p is not None else {"pid": pid, "ppid": 0, "uid": s["uid"], "comm": "",
                                                "exe": "", "args": []}
        proc["ancestry"] = tracer.procs.ancestry(pid) if pid else []
        rec = {"ts": format_ns(t), "kind": "connect", "node": tracer.node, "agent": tracer.agents.agent(agent_cid),
               "proc": proc}
        if s["inbound"]:
            rec["kind"] = "listen"
            remote = dict(s["dst"], scope=tracer.scoper.scope(s["dst"]["addr"]))
            rec["net"] = {"proto": "tcp", "family": s["family"], "op": "inventory", "what": "accept",
                          "local": s["src"], "remote": remote, "cookie": s["cookie"]}
        else:
            rec["net"] = {"proto": "tcp", "family": s["family"], "op": "inventory", "src": s["src"],
                          "dst": tracer.enrich._dst(agent_cid, s["dst"]["addr"], s["dst"]["port"]),
                          "verdict": "allowed", "result": "established", "cookie": s["cookie"]}
        tracer._process(Event(rec["kind"], t, rec, pid, agent_cid, s["cookie"]))
        n += 1
    tracer._flush()
    return n
