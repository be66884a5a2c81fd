"""Decode + enrich: ring-buffer records → pipeline Events in the the record contract (tracer/schema/event.schema.json) shape.

Runs in the reader's callback, so it must stay cheap: dict building, a process-table lookup,
a cached scope lookup; /proc is touched only for processes we have not seen.
"""
from __future__ import annotations

import ctypes as C
import socket
import time
from collections import OrderedDict

from agenttrace.kernel import wire as E
from agenttrace.enrich.cgroups import AgentResolver
from agenttrace.enrich.scope import Scoper
from agenttrace.session.event import Event
from agenttrace.enrich.proctable import ProcTable, readlink_exe
from agenttrace.timefmt import format_ns
from agenttrace.enrich.freshexe import SYSTEM_PREFIXES

_RESULTS = {E.RESULT_ESTABLISHED: "established", E.RESULT_REFUSED: "refused",
            E.RESULT_ERROR: "error"}
_PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_OPS = {E.OP_CONNECT: "connect", E.OP_SENDMSG: "sendmsg", E.OP_ICMP: "echo"}
_EXEC_S, _EXIT_S, _CONNECT_S, _CONN_RESULT_S, _LISTEN_S = (E.EXEC_S, E.EXIT_S, E.CONNECT_S,
                                                          E.CONN_RESULT_S, E.LISTEN_S)
_FAMILY = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_ACCEPT = E.LISTEN_ACCEPT


def wait_status(status: int) -> tuple[int, int | None]:
    """(exit_code, signal) from a raw wait status; a signal death reads as 128+sig like a shell."""
    sig = status & 0x7F
    if sig:
        return 128 + sig, sig
    return (status >> 8) & 0xFF, None


def _event(kind: str, t_ns: int, record: dict, pid: int, agent: int, cookie: int) -> Event:
    """Event(kind, t_ns, record, pid, agent, cookie) for the hot record types, without the
    constructor call: compiled, that is an allocation and six stores (enricher.pxd)."""
    ev = Event.__new__(Event)
    ev.kind = kind
    ev.t_ns = t_ns
    ev.record = record
    ev.pid = pid
    ev.agent_cgroup_id = agent
    ev.cookie = cookie
    return ev


class Enricher:
    def __init__(self, agents: AgentResolver, procs: ProcTable, scoper: Scoper,
                 node: str | None = None, name_lookup=None, gpu_summary=None):
        self.agents = agents
        self.procs = procs
        self.scoper = scoper
        self._by_type = self._handlers()
        from agenttrace.enrich.decodecache import DecodeCache
        self._decoded = DecodeCache()       # exec fields decoded once per distinct bytes
        from agenttrace.enrich.procshare import SharedProcs
        self.shared_procs = SharedProcs(procs)   # connect/accept records' proc parts (procshare.py)
        self.by_type: dict[int, int] = {}    # records decoded, per wire type (stage counter)
        self.node = node or socket.gethostname()
        self.name_lookup = name_lookup      # (agent_cgroup_id, addr) -> name | None (DNS cache)
        self._dsts: dict = {}               # (agent, addr, port) -> (scoper, dst part): _dst
        self.gpu_summary = gpu_summary      # pid -> gpu dict | None
        self.clock_offset = 0
        self.resync_clock()
        self.argv_read_failures = 0
        self.file_path_read_failures = 0
        self.unknown_types = 0
        self.device_names: dict = {}
        # policy id -> rule id of the kernel policy in the maps; None while none is installed
        self.policy_rule = None
        # records taken so far (on_view, __call__): a repeat of the previous record is told by it
        self.tick = 0
        # the last connect record built, for the next one if it repeats it (_connect_repeat)
        self._cmemo = None
        self._cmemo_at = -1     # the tick of the record it was built or last repeated for
        self.connect_repeats = 0
        # TCP connects waiting for their outcome, by socket cookie (unique for the boot; a
        # kernel socket address is reused as soon as the socket is freed), and the cookie
        # held for each socket address, since the outcome tracepoint knows only the address
        self.pending: dict[int, tuple[Event, int, int]] = {}
        self._pending_sk: dict[int, int] = {}
        # held connects let go before their outcome because a newer connect took over their
        # socket address (the kernel keeps one pending entry per address): each still goes
        # out, with result "pending", and is counted here
        self.pending_displaced = 0
        # socket cookie -> (tgid, agent cgroup id) from connect/accept records: skb records
        # seen in softirq (or on kernels without bpf_get_current_* there) carry no process
        self.sockets: "OrderedDict[int, int]" = OrderedDict()   # cookie -> agent << 32 | tgid
        # (tgid, family, type) of each socket the `packet` probe reported, for the packet scan
        # (enrich/packetscan.py), which must not report the same socket a second time
        self.on_probe_socket = None
        from agenttrace.enrich.exeid import ExeIdentifier
        self.exe_ids = ExeIdentifier()      # its reads of likely programs: warm()
        self._warmed = False
        # who did what, kept past exit: download-then-exec and GPU+network look back with it
        from agenttrace.enrich.activity import Activity
        from agenttrace.enrich.freshexe import FreshExe
        from agenttrace.enrich.gpunet import GpuNet
        self.activity = Activity(start_of=self._start_wall)
        self.fresh_exe = FreshExe(self.activity)
        self.gpu_net = GpuNet(self.activity, self._identity)
        from agenttrace.enrich.sshconfig import SshSessions
        self.ssh_sessions = SshSessions()   # imported now: not on the first ssh exec's clock
        from agenttrace.decode.dnscache import NameCache
        from agenttrace.clock import SystemClock
        self.names = NameCache(SystemClock())
        if self.name_lookup is None:
            self.name_lookup = self.names.lookup

    def resync_clock(self) -> None:
        # ktime is CLOCK_MONOTONIC; the offset to wall time moves with NTP, so it is re-read
        # periodically rather than once
        self.clock_offset = time.time_ns() - time.monotonic_ns()

    def _base(self, kind: str, h: E.Header) -> tuple[dict, int]:
        return self._base_t(kind, h.ktime, h.agent_cgroup_id)

    def _base_t(self, kind: str, ktime: int, agent: int) -> tuple[dict, int]:
        t = ktime + self.clock_offset
        return {"ts": format_ns(t), "kind": kind, "node": self.node,
                "agent": self.agents.agent(agent)}, t

    def _proc(self, h: E.Header) -> dict:
        return self._proc_t(h.tgid, h.uid, h.comm, h.ktime)

    def _proc_t(self, tgid: int, uid: int, comm: bytes, ktime: int = 0) -> dict:
        """The record's `proc` part; `ktime`, the record's kernel time, lets the table answer
        for a process that was already gone without looking again (ProcTable.get)."""
        procs = self.procs
        p = procs.get(tgid, ktime)
        if p is None:
            rec = {"pid": tgid, "ppid": 0, "uid": uid, "comm": E.cstr(comm), "exe": "",
                   "args": [], "exec_id": None, "parent_exec_id": None}
        else:
            rec = p.record()
        rec["ancestry"] = procs.ancestry(tgid)
        if self.gpu_summary is not None:
            g = self.gpu_summary(tgid)
            if g:
                rec["gpu"] = g
        return rec

    def _handlers(self) -> dict:
        """Record type → handler returning the events it yields: one entry per wire type, so a
        new probe family adds a line here and a struct in events.BY_TYPE, nothing else."""
        one = lambda f: (lambda o: [f(o)])   # noqa: E731
        # the hot types read their fields straight from the record's bytes (`on_view`); a
        # ctypes object of one of them (tests, the fuzzer) goes through the same handler
        self._by_view = {E.EV_EXEC: self._exec_v, E.EV_EXIT: self._exit_v,
                         E.EV_CONNECT: self._connect_v, E.EV_CONN_RESULT: self._result_v,
                         E.EV_LISTEN: self._listen_v}
        by_obj = {t: (lambda f: lambda o: f(memoryview(bytes(o))))(f) for t, f in self._by_view.items()}
        return {
            E.EV_FORK: one(self._fork),
            E.EV_DEVICE: one(self._device), E.EV_FLOW: one(self._flow), E.EV_DNS: one(self._dns),
            E.EV_FILE: one(self._file),
            E.EV_SOCKET: one(self._socket), E.EV_ESCAPE: self._escape,
            E.EV_SNI: one(self._sni), **by_obj,
        }

    def _escape(self, o) -> list[Event]:
        from agenttrace.decode.escape import escape_event
        ev = escape_event(self, o)
        return [ev] if ev is not None else []

    def on_view(self, view, size: int) -> list[Event]:
        """One ring-buffer record (a buffer valid only during the call): the events ready to go
        on. The hot types are read in place; the rest through their ctypes mirror."""
        self.tick += 1
        rtype = view[0] | view[1] << 8
        h = self._by_view.get(rtype)
        if h is None:
            rtype, obj = E.decode_buf(view, size)
            if obj is None:
                self.unknown_types += 1
                return []
            return self(rtype, obj)
        # _run's steps, without the call: this is every hot record's path
        by_type = self.by_type
        by_type[rtype] = by_type.get(rtype, 0) + 1
        out = h(view)
        if out:
            act = self.activity
            kinds = act.KINDS
            try:
                for ev in out:
                    kind = ev.kind
                    if kind in kinds:
                        act.observe(kind, ev.t_ns, ev.pid, ev.agent_cgroup_id, ev.record)
            except Exception:      # the look-back memory is an enricher: failing, it never drops records
                act.stats["errors"] += 1
        return out

    def __call__(self, rtype: int, o) -> list[Event]:
        """Returns the events ready to go on (connects may be held for their outcome)."""
        self.tick += 1
        h = self._by_type.get(rtype)
        if h is None:
            self.unknown_types += 1
            return []
        return self._run(rtype, h, o)

    def _run(self, rtype: int, h, o) -> list[Event]:
        by_type = self.by_type
        by_type[rtype] = by_type.get(rtype, 0) + 1
        out = h(o)
        if out:
            seen = self.activity.observe
            kinds = self.activity.KINDS
            try:
                for ev in out:
                    if ev.kind in kinds:
                        seen(ev.kind, ev.t_ns, ev.pid, ev.agent_cgroup_id, ev.record)
            except Exception:      # the look-back memory is an enricher: failing, it never drops records
                self.activity.stats["errors"] += 1
        return out

    def _start_wall(self, pid: int) -> int:
        p = self.procs.peek(pid)
        return p.start_ktime + self.clock_offset if p is not None and p.start_ktime else 0

    def gpu_event(self, ev: Event) -> Event:
        """A `gpu` record from the GPU service: the holder's identity and egress (enrich/gpunet.py)."""
        try:
            self.gpu_net.annotate(ev.record, ev.pid, ev.agent_cgroup_id, ev.t_ns)
        except Exception:
            self.gpu_net.stats["errors"] += 1
        return ev

    def _exec_v(self, v) -> list[Event]:
        (tgid, uid, ktime, cgroup_id, agent, comm, ppid, flags, n, policy_id, creator,
         raw_name) = E.unpack(_EXEC_S, v)
        dc = self._decoded
        filename = dc.text(raw_name)
        args = dc.argv(E.exec_args(v, n)) if n else []
        exe = filename
        if filename[:1] != "/" or filename.startswith(("/dev/fd/", "/proc/")):
            # execveat(fd, "", AT_EMPTY_PATH) / fexecve of a memfd / relative paths: the
            # kernel's name says little, the exe link says what ran (if the process still runs)
            exe = readlink_exe(tgid) or filename
        procs = self.procs
        p = procs.on_exec(tgid, ppid, uid, dc.text(comm), exe, args, ktime, creator)
        rec, t = self._base_t("exec", ktime, agent)
        proc = p.record()
        proc["ancestry"] = procs.ancestry(tgid)
        proc["filename"] = filename
        # who forked it, whoever its parent is now: what the fork record used to say
        proc["creator"] = p.parent or None
        if flags:
            if flags & E.EXEC_ARGS_TRUNCATED:
                proc["args_truncated"] = True
            if flags & E.EXEC_ARGS_READ_FAILED:
                proc["args_read_failed"] = True
                self.argv_read_failures += 1
            if flags & E.EXEC_KILLED:
                proc["killed_in_kernel"] = True
        if policy_id:
            proc["policy_id"] = policy_id
        ident = self._identity(tgid, filename, exe, args, ktime)
        if ident:
            proc["identity"] = ident
        if not filename.startswith(SYSTEM_PREFIXES):     # FreshExe.check's own first test
            try:
                fresh = self.fresh_exe.check(tgid, agent, filename, t, ppid)
            except Exception:
                fresh = None
                self.fresh_exe.stats["errors"] += 1
            if fresh:
                proc["fresh_exe"] = fresh
        s = getattr(self, "ssh_sessions", None)
        # SshSessions.on_exec does nothing for a program that is not ssh while no proxying
        # session is remembered: the call is skipped then
        if s is None or s.proxies or exe == "ssh" or exe.endswith("/ssh") or (
                ident and ident.get("name") == "openssh-client"):
            self._ssh(tgid, uid, exe, args, proc)
        p.cgroup_id, p.agent_cgroup_id = cgroup_id, agent
        rec["proc"] = proc
        return [_event("exec", t, rec, tgid, agent, 0)]

    def _fork(self, o: E.Fork) -> Event:
        h = o.h
        child = self.procs.on_fork(o.parent_tgid, o.child_tgid, h.ktime, h.uid, E.cstr(h.comm))
        child.cgroup_id, child.agent_cgroup_id = h.cgroup_id, h.agent_cgroup_id
        rec, t = self._base("fork", h)
        proc = child.record()
        proc["ancestry"] = self.procs.ancestry(o.child_tgid)
        rec["proc"] = proc
        return Event("fork", t, rec, o.child_tgid, h.agent_cgroup_id)

    def _exit_v(self, v) -> list[Event]:
        tgid, uid, ktime, agent, comm, exit_code, start = E.unpack(_EXIT_S, v)
        rec, t = self._base_t("exit", ktime, agent)
        rec["proc"] = self._proc_t(tgid, uid, comm, ktime)
        code, sig = wait_status(exit_code)
        rec["exit_code"] = code
        if sig is not None:
            rec["signal"] = sig
        if not start:
            p = self.procs.peek(tgid)
            start = p.start_ktime if p else 0
        rec["duration_ms"] = round((ktime - start) / 1e6, 3) if start and ktime >= start else None
        self.procs.on_exit(tgid)
        return [_event("exit", t, rec, tgid, agent, 0)]

    def _device(self, o: E.Device) -> Event:
        from agenttrace.gpu.service import device_body
        h = o.h
        rec, t = self._base("device", h)
        rec["proc"] = self._proc(h)
        rec["device"] = device_body(o.major, o.minor, o.access, o.dev_type, o.verdict, self.device_names)
        return Event("device", t, rec, h.tgid, h.agent_cgroup_id)

    def _file(self, o: E.File) -> Event:
        from agenttrace.decode.files import file_body
        h = o.h
        rec, t = self._base("file", h)
        rec["proc"] = self._proc(h)
        read_failed = bool(o.fflags & E.FILE_READ_FAILED)
        if read_failed:
            self.file_path_read_failures += 1
        raw = "" if read_failed else E.cstr(o.path)
        rec["file"] = file_body(raw, o.op, E.SYS_NAMES.get(o.syscall, str(o.syscall)), o.flags,
                                E.FCLASS_NAMES.get(o.fclass) if o.fclass else None,
                                bool(o.fflags & E.FILE_KILLED), o.policy_id, h.tgid, o.dfd,
                                read_failed, bool(o.fflags & E.FILE_PATH_TRUNCATED),
                                bool(o.fflags & E.FILE_LATE_READ))
        return Event("file", t, rec, h.tgid, h.agent_cgroup_id)

    def _socket(self, o: E.Socket) -> Event:
        from agenttrace.kernel.sockfence import socket_body
        h = o.h
        rec, t = self._base("socket", h)
        rec["proc"] = self._proc(h)
        rec["socket"] = socket_body(o)
        if self.on_probe_socket is not None and o.flags & E.SOCK_F_SYSCALL:
            self.on_probe_socket(h.tgid, o.family, o.type)
        return Event("socket", t, rec, h.tgid, h.agent_cgroup_id)

    def _remember_socket(self, cookie: int, tgid: int, agent: int) -> None:
        if not cookie or not tgid:
            return
        socks = self.sockets
        if cookie in socks:
            socks.move_to_end(cookie)
        # one int per socket, not a (tgid, agent) tuple: at the 65,536 the map holds after a
        # storm of connects that is ~7 MB of the tracer's RSS instead of ~14
        socks[cookie] = agent << 32 | tgid       # a new key goes last: no move needed
        if len(socks) > 65536:
            socks.popitem(last=False)

    def _owner(self, h: E.Header, cookie: int) -> E.Header:
        """The header with the socket's owner filled in when the kernel could not tell."""
        if h.tgid or not cookie:
            return h
        own = self.sockets.get(cookie)
        if own is not None:
            h.tgid = h.pid = own & 0xFFFFFFFF
            if not h.agent_cgroup_id:
                h.agent_cgroup_id = own >> 32
        return h

    def warm(self) -> None:
        """Read the programs most likely to exec first (exeid.ExeIdentifier.warm), so the first
        execs are not identified on the reader's clock. The session calls it right after
        `started`, before it reads a record or starts a command; otherwise the first exec does."""
        if self._warmed:
            return
        self._warmed = True
        try:
            self.exe_ids.warm()
        except Exception:   # an enrichment cache: the session runs without it being warm
            pass

    def _identity(self, pid: int, filename: str, exe: str, args: list, ktime: int = 0) -> dict | None:
        """What the exec ran by content (tracer/enrich/exeid.py); never stops the pipeline."""
        if not self._warmed:
            self.warm()
        ids = self.exe_ids
        # when the exec happened, for identify's re-use of a recent stat (exeid._gone); an
        # attribute, not an argument: identify's signature is what stand-ins replace
        ids.exec_ktime = ktime
        try:
            return ids.identify(pid, filename, exe, args)
        except Exception:
            ids.stats["unreadable"] += 1
            return None
        finally:
            ids.exec_ktime = 0

    def _ssh(self, pid: int, uid: int, exe: str, args: list, proc: dict) -> None:
        """An OpenSSH client: what its argv and config files make it do (tracer/enrich/sshconfig.py)."""
        from agenttrace.enrich.sshconfig import SshSessions
        s = getattr(self, "ssh_sessions", None)
        if s is None:
            s = self.ssh_sessions = SshSessions()
        try:
            s.on_exec(pid, uid, exe, args, proc)
        except Exception:
            s.errors += 1

    def _relay(self, rec: dict) -> None:
        s = getattr(self, "ssh_sessions", None)
        if s is not None and s.proxies:
            r = s.relay_of(rec["proc"])
            if r:
                rec["proc"]["relay_of"] = r

    def _flow(self, o: E.Flow) -> Event:
        from agenttrace.decode.protocols import flow_parts
        h = self._owner(o.h, o.cookie)
        rec, t = self._base("flow", h)
        rec["proc"] = self._proc(h)
        net, flow = flow_parts(o)
        net["dst"] = self._dst(h.agent_cgroup_id, net["dst"]["addr"], net["dst"]["port"])
        rec["net"] = net
        rec["flow"] = flow
        return Event("flow", t, rec, h.tgid, h.agent_cgroup_id, o.cookie)

    def _sni(self, o: E.Sni) -> Event:
        # the kernel's TLS server-name check (probes/tls.c): a flow record of its own kind
        from agenttrace.decode.tlssni import sni_parts
        h = self._owner(o.h, o.cookie)
        rec, t = self._base("flow", h)
        rec["proc"] = self._proc(h)
        net, flow = sni_parts(o)
        net["dst"] = self._dst(h.agent_cgroup_id, net["dst"]["addr"], net["dst"]["port"])
        if self.policy_rule is not None and o.policy_id:
            net["policy_rule"] = self.policy_rule(o.policy_id)
        rec["net"] = net
        rec["flow"] = flow
        return Event("flow", t, rec, h.tgid, h.agent_cgroup_id, o.cookie)

    def _dns(self, o: E.Dns) -> Event:
        from agenttrace.decode.dns import dns_parts
        h = self._owner(o.h, o.cookie)
        rec, t = self._base("dns", h)
        rec["proc"] = self._proc(h)
        net, body = dns_parts(o)
        net["dst"]["scope"] = self.scoper.scope(net["dst"]["addr"])
        if body.get("answers"):
            try:
                self.names.learn(h.agent_cgroup_id, body)
            except Exception:
                pass
        rec["net"] = net
        rec["dns"] = body
        return Event("dns", t, rec, h.tgid, h.agent_cgroup_id, o.cookie)

    def _listen_v(self, v) -> list[Event]:
        (tgid, uid, ktime, agent, comm, cookie, family, protocol, lport, rport, what, laddr,
         raddr) = E.unpack(_LISTEN_S, v)
        self._remember_socket(cookie, tgid, agent)
        fam = _FAMILY.get(family)
        accept = what == _ACCEPT
        net = {"proto": _PROTO.get(protocol, "tcp"), "family": fam if fam is not None else str(family),
               "local": {"addr": E.addr_str(laddr, family), "port": lport},
               "what": "accept" if accept else "listen"}
        if accept:
            raddr = E.addr_str(raddr, family)
            net["remote"] = {"addr": raddr, "port": rport, "scope": self.scoper.scope(raddr)}
        # _base_t's record with its parts in one literal (same keys, same order): every
        # accept of a TCP storm comes here
        t = ktime + self.clock_offset
        rec = {"ts": format_ns(t), "kind": "listen", "node": self.node, "agent": self.agents.agent(agent),
               "proc": self.shared_procs.part(tgid, uid, comm, self._proc_t, self.gpu_summary, ktime), "net": net}
        return [_event("listen", t, rec, tgid, agent, cookie)]

    def _dst(self, agent_id: int, addr: str, port: int) -> dict:
        # one dict per destination while its scope and DNS name are what they were: a storm to
        # one listener gives its connects the same `dst`, and the engine its candidates by it
        # (engine.process; nothing edits a record's dst once built)
        name = self.name_lookup(agent_id, addr) if self.name_lookup is not None else None
        key = (agent_id, addr, port)
        m = self._dsts.get(key)
        if m is not None and m[0] is self.scoper and m[1]["name"] == name:
            return m[1]
        d = {"addr": addr, "port": port, "scope": self.scoper.scope(addr), "name": name}
        if len(self._dsts) >= 4096:
            self._dsts.clear()
        self._dsts[key] = (self.scoper, d)
        return d

    def _connect_v(self, v) -> list[Event]:
        f = E.unpack(_CONNECT_S, v)
        m = self._cmemo
        if self._cmemo_at == self.tick - 1 and m[0] == f[:2] and m[1] == f[3:]:
            ev = self._connect_repeat(m, f)
            if ev is not None:
                return [ev]
        (tgid, uid, ktime, agent, comm, cookie, sk, family, protocol, dport, op, verdict, daddr,
         policy_id) = f
        rec, t = self._base_t("connect", ktime, agent)
        s = getattr(self, "ssh_sessions", None)
        relaying = s is not None and s.proxies
        # _relay adds to the proc part: then it is this record's own
        rec["proc"] = (self._proc_t(tgid, uid, comm, ktime) if relaying else
                       self.shared_procs.part(tgid, uid, comm, self._proc_t, self.gpu_summary, ktime))
        addr = E.addr_str(daddr, family)
        proto = _PROTO.get(protocol)
        if proto is None:
            proto = str(protocol)
        fam = _FAMILY.get(family)
        blocked = verdict == E.VERDICT_BLOCKED
        net = {"proto": proto, "family": fam if fam is not None else str(family),
               "op": _OPS.get(op, "connect"),
               "src": None, "dst": self._dst(agent, addr, dport),
               "verdict": "blocked" if blocked else "allowed",
               "result": "blocked" if blocked else ("sent" if proto != "tcp" else "pending")}
        if policy_id:
            net["policy_id"] = policy_id
        if self.policy_rule is not None:
            net["policy_rule"] = self.policy_rule(policy_id) if policy_id else None
        rec["net"] = net
        if relaying:         # _relay's own test, without the call
            self._relay(rec)
        ev = _event("connect", t, rec, tgid, agent, cookie)
        self._remember_socket(cookie, tgid, agent)
        if net["result"] == "pending":
            out = []
            pending = self.pending
            # a newer connect on the same socket address, or the same cookie again, lets the
            # held one go as "pending" (one entry per address in the kernel too)
            prev = self._pending_sk.get(sk)
            for key in ({prev, cookie} if prev is not None and prev != cookie else (cookie,)):
                old = pending.pop(key, None)
                if old is not None:
                    self.pending_displaced += 1
                    out.append(old[0])
            pending[cookie] = (ev, time.monotonic_ns(), sk)
            self._pending_sk[sk] = cookie
            return out
        if not relaying:
            # its outcome is final (UDP, ICMP, blocked): nothing edits it later, so a repeat may
            # share its parts (_connect_repeat)
            p = self.procs.peek(tgid)
            if p is not None:
                self._cmemo = (f[:2], f[3:], p, self.procs.generation, self.policy_rule,
                               rec["proc"].get("gpu"), net["dst"]["name"], rec["proc"], net, addr)
                self._cmemo_at = self.tick
        return [ev]

    def _connect_repeat(self, m, f) -> Event | None:
        """The previous record again, but for its time (one socket connected over and over, e.g.
        a UDP client re-aiming, or the bench's rate generator): the record is the previous one's
        `proc` and `net`, shared, when nothing they were built from has changed since: the same
        process entry and ancestry (no record came in between, the table's generation is the
        same), the same policy names, GPU summary and DNS name, no ssh proxying. None: build it.
        Sharing is safe because a connect whose outcome is final is never edited (alerts share
        their trigger's parts the same way, engine._alert_record)."""
        tgid, ktime, agent = f[0], f[2], f[3]
        procs = self.procs
        if procs.peek(tgid) is not m[2] or procs.generation != m[3] or self.policy_rule is not m[4]:
            return None
        if self.gpu_summary is not None and self.gpu_summary(tgid) is not m[5]:
            return None
        s = getattr(self, "ssh_sessions", None)
        if s is not None and s.proxies:
            return None
        if self.name_lookup is not None and self.name_lookup(agent, m[9]) != m[6]:
            return None
        t = ktime + self.clock_offset
        rec = {"ts": format_ns(t), "kind": "connect", "node": self.node, "agent": self.agents.agent(agent),
               "proc": m[7], "net": m[8]}
        self._cmemo_at = self.tick
        self.connect_repeats += 1
        # its socket is already the newest one remembered, with this owner: the previous
        # record put it there and no record came in between (_remember_socket)
        return _event("connect", t, rec, tgid, agent, f[5])

    def _result_v(self, v) -> list[Event]:
        sk, family, sport, result, error, saddr = E.unpack(_CONN_RESULT_S, v)
        cookie = self._pending_sk.pop(sk, None)
        held = self.pending.pop(cookie, None) if cookie is not None else None
        if held is None:
            return []   # the connect was already released as pending (slow handshake)
        ev = held[0]
        net = ev.record["net"]
        net["result"] = _RESULTS.get(result, "error")
        if error:
            net["error"] = error
        net["src"] = {"addr": E.addr_str(saddr, family), "port": sport}
        return [ev]

    def pending_due(self, older_than_ns: int) -> bool:
        """A held connect is older than that (the first entry is the oldest: a connect is
        added last, and one held again is popped first)."""
        for _ev, since, _sk in self.pending.values():
            return time.monotonic_ns() - since >= older_than_ns
        return False

    def expire_pending(self, older_than_ns: int) -> list[Event]:
        """Release connects whose outcome has not arrived (slow or silently failed handshakes)."""
        if not self.pending:
            return []
        now = time.monotonic_ns()
        out = []
        for cookie, (ev, since, sk) in list(self.pending.items()):
            if now - since >= older_than_ns:
                del self.pending[cookie]
                if self._pending_sk.get(sk) == cookie:
                    del self._pending_sk[sk]
                out.append(ev)
        self._released(out)
        return out

    def flush_pending(self) -> list[Event]:
        out = [v[0] for v in self.pending.values()]
        self.pending.clear()
        self._pending_sk.clear()
        self._released(out)
        return out

    def _released(self, out: list) -> None:
        # a connect let go without its outcome is still a contact: the look-back memory sees
        # it as it sees one released by its result (on_view), or download-then-exec misses a
        # download whose handshake outlived the hold
        act = self.activity
        try:
            for ev in out:
                act.observe(ev.kind, ev.t_ns, ev.pid, ev.agent_cgroup_id, ev.record)
        except Exception:
            act.stats["errors"] += 1
