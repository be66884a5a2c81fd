"""What each agent process was and whom it reached outside, kept after it exits.

Two detections need to look back across processes, which a rule over one record cannot:

- *download-then-exec* (tracer/enrich/freshexe.py): at the exec of a freshly written executable,
  which process of the same agent was alive when the file was written and had talked to an
  external destination (the downloader, judged by network behaviour, not by name)?
- *GPU + network* (tracer/enrich/gpunet.py): does a GPU-busy process, or a process it started,
  hold connections to external destinations (a pool)?

Fed from the enrich stage with the records it already makes (exec, fork when fork records are
on, exit, connect, flow; with them off an exec inherits along its creator chain):
no probe of its own, no syscall tracepoint. Only the processes a question is about get an entry
(an external contact, or a build tool/installer and what it starts); for the rest an exec keeps
its identity per pid and a fork or exit costs a lookup. Bounded: `max_procs` entries (least
recently touched evicted, counted in `stats`), `MAX_CONTACTS` external contacts per process.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

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
                 "identity", "tool", "tool_by", "contacts", "anc")

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
        self.anc: tuple = ()                 # creator chain pids, nearest first

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
    def __init__(self, max_procs: int = 8192, start_of=None):
        self.max_procs = max_procs
        self.start_of = start_of             # pid -> wall ns it started (the process table), or None
        self.procs: "OrderedDict[int, Actor]" = OrderedDict()
        self.idents: "OrderedDict[int, Optional[dict]]" = OrderedDict()   # pid -> identity at its exec
        # per agent, the few actors the questions are about: those with external contacts and
        # the build tools/installers (an exec of a fresh file looks at these, not at every process)
        self.networked: Dict[int, Dict[int, Actor]] = {}
        self.tools: Dict[int, Dict[int, Actor]] = {}
        self.stats = {"evicted": 0, "contacts_dropped": 0, "errors": 0}

    # -- feeding ------------------------------------------------------------------------------
    def _forget(self, a: Actor) -> None:
        for index in (self.networked, self.tools):
            d = index.get(a.agent)
            if d is not None and d.get(a.pid) is a:
                del d[a.pid]
                if not d:
                    del index[a.agent]

    def _actor(self, pid: int, agent: int, t_ns: int) -> Actor:
        a = self.procs.get(pid)
        if a is None or (a.end_ns is not None and t_ns > a.end_ns):
            if a is not None:
                self._forget(a)               # a recycled pid: the old process is gone
            a = Actor(pid, agent, t_ns)
            self.procs[pid] = a
            if len(self.procs) > self.max_procs:
                self._forget(self.procs.popitem(last=False)[1])
                self.stats["evicted"] += 1
        else:
            self.procs.move_to_end(pid)
        if agent and not a.agent:
            a.agent = agent
        return a

    def _set_tool(self, a: Actor, tool: str, by: str) -> None:
        a.tool, a.tool_by = tool, by
        if tool:
            self.tools.setdefault(a.agent, {})[a.pid] = a
        else:
            d = self.tools.get(a.agent)
            if d is not None and d.get(a.pid) is a:
                del d[a.pid]

    def _ident(self, pid: int, ident: Optional[dict]) -> None:
        d = self.idents
        d[pid] = ident
        d.move_to_end(pid)
        if len(d) > self.max_procs:
            d.popitem(last=False)

    def _fill(self, a: Actor, proc: dict, ident: Optional[dict]) -> None:
        a.comm, a.exe, a.exec_id = proc.get("comm") or "", proc.get("exe") or "", proc.get("exec_id")
        a.ppid = proc.get("ppid") or a.ppid
        a.identity = ident
        a.anc = tuple([x.get("pid") for x in (proc.get("ancestry") or ()) if isinstance(x, dict)])

    # the kinds `observe` looks at: the enricher does not call it for the others (listen, dns...)
    KINDS = frozenset(("exec", "fork", "exit", "connect", "flow"))

    def observe(self, kind: str, t_ns: int, pid: int, agent: int, rec: dict) -> None:
        """One enriched record. Only processes a question is about get an entry: those with an
        external contact, and build tools/installers with what they start; everything else
        costs a dict lookup or two (exec: one identity kept per pid)."""
        if not pid:
            return
        if kind == "exit":
            a = self.procs.get(pid)
            if a is not None and a.end_ns is None:
                a.end_ns = t_ns
            return
        if kind == "connect" or kind == "flow":
            self._contact(kind, t_ns, pid, agent, rec)
            return
        proc = rec.get("proc")
        if not proc:
            return
        if kind == "exec":
            ident = proc.get("identity")
            self._ident(pid, ident)
            own = _tool_of(ident)
            parent = self.procs.get(proc.get("ppid") or 0)
            if parent is None and self.procs:
                # reparented, or a fork-only creator no fork record made an actor of (fork
                # records off): the nearest ancestor on the creator chain that has one
                for anc in proc.get("ancestry") or ():
                    parent = self.procs.get(anc.get("pid") or 0) if isinstance(anc, dict) else None
                    if parent is not None:
                        break
            ptool = parent.tool if parent is not None and parent.end_ns is None else ""
            a = self.procs.get(pid)
            if own or ptool:
                a = self._actor(pid, agent, t_ns)
                self._fill(a, proc, ident)
                self._set_tool(a, own or ptool, ((ident or {}).get("name") or "") if own else parent.tool_by)
            elif a is not None and a.end_ns is None:
                self._fill(a, proc, ident)      # a remembered process runs something else now
                if a.tool:
                    self._set_tool(a, "", "")
        elif kind == "fork":
            parent = self.procs.get(proc.get("ppid") or 0)
            if parent is not None and parent.tool and parent.end_ns is None:
                a = self._actor(pid, agent, t_ns)
                self._fill(a, proc, parent.identity)
                a.comm, a.exe = parent.comm, parent.exe
                self._set_tool(a, parent.tool, parent.tool_by)

    def _contact(self, kind: str, t_ns: int, pid: int, agent: int, rec: dict) -> None:
        net = rec.get("net") or {}
        dst = net.get("dst") or {}
        if dst.get("scope") != "external" or net.get("verdict") == "blocked":
            return
        if kind == "connect" and net.get("result") not in ("established", "sent", "pending"):
            return
        a = self.procs.get(pid)
        if a is None or a.end_ns is not None:
            if a is not None:                   # an exited process's pid, reused
                self._forget(a)
                del self.procs[pid]
            start = self.start_of(pid) if self.start_of is not None else 0
            a = self._actor(pid, agent, start or 0)   # 0: started before we looked, alive since ever
            self._fill(a, rec.get("proc") or {}, self.idents.get(pid))
        flow = rec.get("flow") or {}
        detail = flow.get("detail") or {}
        host = str(detail.get("sni") or detail.get("host") or "")
        src = net.get("src") or {}
        proto = flow.get("protocol") or ""
        for c in a.contacts:
            if c.addr == dst.get("addr") and c.port == dst.get("port"):
                if proto and proto != "unknown":
                    c.protocol = proto
                c.host = c.host or host
                c.name = c.name or (dst.get("name") or "")
                c.sport = c.sport or int(src.get("port") or 0)
                return
        if len(a.contacts) >= MAX_CONTACTS:
            self.stats["contacts_dropped"] += 1
            return
        if not a.contacts:
            self.networked.setdefault(a.agent, {})[a.pid] = a
        a.contacts.append(Contact(t_ns, str(dst.get("addr")), int(dst.get("port") or 0), "external",
                                  dst.get("name") or "", net.get("proto") or "",
                                  "" if proto == "unknown" else proto, host, int(src.get("port") or 0)))

    # -- questions ----------------------------------------------------------------------------
    def with_contacts(self, agent: int) -> List[Actor]:
        return list(self.networked.get(agent, {}).values())

    def tools_of(self, agent: int) -> List[Actor]:
        return list(self.tools.get(agent, {}).values())

    def tree(self, root: int, agent: int) -> List[Actor]:
        """`root` and the processes it started (its creator chain, as the process table kept
        it) that have external contacts and still run."""
        return [a for a in self.with_contacts(agent)
                if a.end_ns is None and (a.pid == root or root in a.anc)]

    def identity(self, pid: int) -> Optional[dict]:
        return self.idents.get(pid)

    def counters(self) -> Dict[str, int]:
        return {"processes": len(self.procs), "networked": sum(len(d) for d in self.networked.values()),
                "tools": sum(len(d) for d in self.tools.values()), **self.stats}
