"""What each agent process was and whom it reached outside, kept after it exits.

Two detections need to look back across processes, which a rule over one record cannot:

- *download-then-exec* (tracer/enrich/freshexe.py): at the exec of a freshly written executable,
  which process of the same agent was alive when the file was written and had talked to an
  external destination (the downloader, judged by network behaviour, not by name)?
- *GPU + network* (tracer/enrich/gpunet.py): does a GPU-busy process, or a process it started,
  hold connections to external destinations (a pool)?

Fed from the enrich stage with the records it already makes (exec, fork, exit, connect, flow):
no probe of its own, no syscall tracepoint. Bounded: `max_procs` processes (least recently
touched evicted, counted in `stats`), `MAX_CONTACTS` external contacts per process.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterator, List, Optional

MAX_CONTACTS = 8
# identity categories (tracer/enrich/identities.yaml) of programs that write executables for a
# living: their output is not a download, and a process they started inherits the role
TOOL_CLASSES = ("build", "installer")


class Contact:
    __slots__ = ("ts_ns", "addr", "port", "scope", "name", "proto", "protocol", "host", "sport")

    def __init__(self, ts_ns: int, addr: str, port: int, scope: str, name: str, proto: str,
                 protocol: str = "", host: str = "", sport: int = 0):
        self.ts_ns, self.addr, self.port, self.scope, self.name = ts_ns, addr, port, scope, name
        self.proto, self.protocol, self.host, self.sport = proto, protocol, host, sport

    def body(self) -> dict:
        return {"addr": self.addr, "port": self.port, "scope": self.scope, "name": self.name,
                "protocol": self.protocol, "host": self.host}


class Actor:
    __slots__ = ("pid", "ppid", "agent", "comm", "exe", "exec_id", "start_ns", "end_ns",
                 "identity", "tool", "tool_by", "contacts")

    def __init__(self, pid: int, agent: int, start_ns: int):
        self.pid, self.agent, self.start_ns = pid, agent, start_ns
        self.ppid = 0
        self.comm = self.exe = ""
        self.exec_id: Optional[str] = None
        self.end_ns: Optional[int] = None
        self.identity: Optional[dict] = None
        self.tool = ""                       # "build" | "installer" | "" (by content, inherited)
        self.tool_by = ""                    # the identity that gave it: its own or an ancestor's
        self.contacts: List[Contact] = []

    def alive_during(self, lo: int, hi: int) -> bool:
        return self.start_ns <= hi and (self.end_ns is None or self.end_ns >= lo)

    def summary(self) -> dict:
        ident = self.identity or {}
        return {"pid": self.pid, "comm": self.comm, "exe": self.exe, "exec_id": self.exec_id,
                "identity": ident.get("name") or "", "runtime": ident.get("runtime") or ""}


def _tool_of(identity: Optional[dict]) -> str:
    cat = (identity or {}).get("category") or ""
    return cat if cat in TOOL_CLASSES else ""


class Activity:
    def __init__(self, max_procs: int = 8192):
        self.max_procs = max_procs
        self.procs: "OrderedDict[int, Actor]" = OrderedDict()
        self.stats = {"evicted": 0, "contacts_dropped": 0}

    # -- feeding ------------------------------------------------------------------------------
    def _actor(self, pid: int, agent: int, t_ns: int) -> Actor:
        a = self.procs.get(pid)
        if a is None or (a.end_ns is not None and t_ns > a.end_ns):
            a = Actor(pid, agent, t_ns)       # new, or a recycled pid
            self.procs[pid] = a
            if len(self.procs) > self.max_procs:
                self.procs.popitem(last=False)
                self.stats["evicted"] += 1
        else:
            self.procs.move_to_end(pid)
        if agent and not a.agent:
            a.agent = agent
        return a

    def observe(self, kind: str, t_ns: int, pid: int, agent: int, rec: dict) -> None:
        if not pid:
            return
        proc = rec.get("proc") or {}
        if kind == "exec":
            a = self._actor(pid, agent, t_ns)
            a.comm, a.exe, a.exec_id = proc.get("comm") or "", proc.get("exe") or "", proc.get("exec_id")
            a.ppid = proc.get("ppid") or a.ppid
            a.identity = proc.get("identity")
            parent = self.procs.get(a.ppid)
            own = _tool_of(a.identity)
            if own:
                a.tool, a.tool_by = own, (a.identity or {}).get("name") or ""
            elif parent is not None:
                a.tool, a.tool_by = parent.tool, parent.tool_by
            else:
                a.tool = a.tool_by = ""
        elif kind == "fork":
            a = self._actor(pid, agent, t_ns)
            a.ppid = proc.get("ppid") or 0
            parent = self.procs.get(a.ppid)
            if parent is not None:
                a.comm, a.exe, a.identity = parent.comm, parent.exe, parent.identity
                a.tool, a.tool_by = parent.tool, parent.tool_by
            a.exec_id = proc.get("exec_id")
        elif kind == "exit":
            a = self.procs.get(pid)
            if a is not None:
                a.end_ns = t_ns
        elif kind in ("connect", "flow"):
            net = rec.get("net") or {}
            dst = net.get("dst") or {}
            if dst.get("scope") != "external" or net.get("verdict") == "blocked":
                return
            if kind == "connect" and net.get("result") not in ("established", "sent", "pending"):
                return
            a = self.procs.get(pid)
            if a is None:
                a = self._actor(pid, agent, 0)    # started before we looked: alive since ever
                a.comm, a.exe = proc.get("comm") or "", proc.get("exe") or ""
                a.ppid = proc.get("ppid") or 0
            flow = rec.get("flow") or {}
            detail = flow.get("detail") or {}
            host = str(detail.get("sni") or detail.get("host") or "")
            src = net.get("src") or {}
            for c in a.contacts:
                if c.addr == dst.get("addr") and c.port == dst.get("port"):
                    if flow.get("protocol") and flow.get("protocol") != "unknown":
                        c.protocol = flow["protocol"]
                    c.host = c.host or host
                    c.name = c.name or (dst.get("name") or "")
                    c.sport = c.sport or int(src.get("port") or 0)
                    return
            if len(a.contacts) >= MAX_CONTACTS:
                self.stats["contacts_dropped"] += 1
                return
            proto = flow.get("protocol") or ""
            a.contacts.append(Contact(t_ns, str(dst.get("addr")), int(dst.get("port") or 0), "external",
                                      dst.get("name") or "", net.get("proto") or "",
                                      "" if proto == "unknown" else proto, host, int(src.get("port") or 0)))

    # -- questions ----------------------------------------------------------------------------
    def of_agent(self, agent: int) -> Iterator[Actor]:
        return (a for a in self.procs.values() if a.agent == agent)

    def descends_from(self, a: Actor, root: int, depth: int = 16) -> bool:
        seen = set()
        cur: Optional[Actor] = a
        while cur is not None and depth > 0 and cur.pid not in seen:
            if cur.pid == root:
                return True
            seen.add(cur.pid)
            cur = self.procs.get(cur.ppid)
            depth -= 1
        return False

    def tree(self, root: int, agent: int) -> List[Actor]:
        """`root` and the processes it started (as far as seen), in the same agent."""
        return [a for a in self.of_agent(agent) if a.end_ns is None and self.descends_from(a, root)]

    def identity(self, pid: int) -> Optional[dict]:
        a = self.procs.get(pid)
        return a.identity if a is not None else None

    def counters(self) -> Dict[str, int]:
        return {"processes": len(self.procs), **self.stats}
