"""One `summary` record per agent when its cgroup goes away (or `run -- CMD` ends).

Built from exactly the records the sinks were given for that agent, so a trainer or a
person can trust its counts: records by kind, processes, the root process's exit, alerts
by rule and outcome, destinations and DNS names (top N with counts), connects and flows by
protocol, GPU seconds and peak memory per GPU. Per-agent state is bounded: past
`MAX_DISTINCT` distinct destinations/names the rest are counted as `other`.
"""
from __future__ import annotations

import time
from typing import Optional

from agenttrace.session.event import Event
from agenttrace.timefmt import format_ns

TOP_N = 10
MAX_DISTINCT = 4096


def _parse_ns(ts: str) -> int:
    from agenttrace.timefmt import parse_ns
    return parse_ns(ts)


class _Agent:
    __slots__ = ("ident", "first", "last", "kinds", "execs", "forks", "pids", "root", "root_exit",
                 "alerts", "dests", "dests_other", "names", "names_other", "connects", "flows",
                 "gpu", "gpu_open", "seen_pids")

    def __init__(self, ident: dict):
        self.ident = ident
        self.first = self.last = None
        self.kinds: dict = {}
        self.execs = self.forks = 0
        self.pids = _Pids()
        # pids known to be inside the agent, for finding the root; dropped once it is found
        self.seen_pids: Optional[set] = set()
        self.root: Optional[dict] = None
        self.root_exit: Optional[dict] = None
        self.alerts: dict = {}
        self.dests: dict = {}
        self.dests_other = 0
        self.names: dict = {}
        self.names_other = 0
        self.connects: dict = {}
        self.flows: dict = {}
        self.gpu: dict = {}             # gpu key -> {index, uuid, name, peak_memory_mib, seconds}
        self.gpu_open: dict = {}        # (gpu key, pid) -> acquired ns


class _Pids:
    """The distinct pids of one agent, counted exactly in bounded memory: a set while small,
    then one bit per pid value (pid_max is at most 2**22: 512 KiB). A set held ~90 bytes per
    pid for the agent's whole life; an exec storm of a million processes kept ~90 MB."""
    __slots__ = ("_set", "_bits", "n")
    SET_MAX = 4096

    def __init__(self):
        self._set: Optional[set] = set()
        self._bits: Optional[bytearray] = None
        self.n = 0

    def add(self, pid: int) -> None:
        s = self._set
        if s is not None:
            if pid in s:
                return
            s.add(pid)
            self.n += 1
            if len(s) > self.SET_MAX and self._bits is None:
                self._to_bits()
            return
        if type(pid) is not int or pid < 0:
            return      # never from the enricher (pids are ints): not worth a slot
        i, bit = pid >> 3, 1 << (pid & 7)
        b = self._bits
        if i >= len(b):
            b.extend(bytes(i + 1 - len(b)))
        if not b[i] & bit:
            b[i] |= bit
            self.n += 1

    def _to_bits(self) -> None:
        ints = [p for p in self._set if type(p) is int and p >= 0]
        if len(ints) != len(self._set):
            self._bits = bytearray()    # a non-int pid: stay a set, and do not try again
            return
        b = bytearray((max(ints) >> 3) + 1)
        for p in ints:
            b[p >> 3] |= 1 << (p & 7)
        self._bits, self._set = b, None

    def __len__(self) -> int:
        return self.n


def _bump(d: dict, key, limit: int = MAX_DISTINCT) -> bool:
    if key in d:
        d[key] += 1
        return True
    if len(d) >= limit:
        return False
    d[key] = 1
    return True


class Summaries:
    def __init__(self, node: str, top_n: int = TOP_N):
        self.node = node
        self.top_n = top_n
        self._a: dict[int, _Agent] = {}
        self.waiting: dict[int, int] = {}     # removed agents whose summary waits for the act stage
        # agent cgroup id -> forks whose record stayed in the kernel (kernel/forks.py), or None
        self.quiet_forks = None

    def active(self) -> list[int]:
        return list(self._a)

    def register(self, ident: dict) -> None:
        """An agent discovered before any record: it still gets a summary when it goes."""
        cid = ident.get("cgroup_id")
        if cid and cid not in self._a and ident.get("cgroup_id") == cid:
            self._a[cid] = _Agent(ident)

    def observe(self, rec: dict) -> None:
        # every record the sinks get passes here: the common kinds take the fewest steps
        agent = rec.get("agent")
        if not agent:
            return
        kind = rec.get("kind")
        if kind == "summary":
            return
        cid = agent.get("cgroup_id")
        if not cid:
            return
        a = self._a.get(cid)
        if a is None:
            a = self._a[cid] = _Agent(agent)
        a.ident = agent
        ts = rec.get("ts")
        first = a.first
        if first is None:       # set together with `last` on an agent's first record
            a.first = a.last = ts
        else:
            if ts < first:
                a.first = ts
            if ts > a.last:
                a.last = ts
        kinds = a.kinds
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "exit":
            root = a.root
            if root is not None and a.root_exit is None and (rec.get("proc") or {}).get("pid") == root["pid"]:
                a.root_exit = {"exit_code": rec.get("exit_code"), "signal": rec.get("signal")}
            return
        if kind == "exec" or kind == "fork":
            proc = rec.get("proc") or {}
            pid = proc.get("pid")
            if pid:
                a.pids.add(pid)
            if kind == "exec":
                a.execs += 1
                if a.root is None and proc.get("ppid") not in a.seen_pids:
                    a.root = {"pid": pid, "exec_id": proc.get("exec_id"), "exe": proc.get("exe"),
                              "args": proc.get("args", [])[:8]}
                    a.seen_pids = None      # asked only until the root is known
            else:
                a.forks += 1
            if a.seen_pids is not None:
                a.seen_pids.add(pid)
            return
        if kind == "alert":
            rule = rec.get("rule") or {}
            by = a.alerts.setdefault(rule.get("id", "?"), {})
            out = rule.get("outcome", "?")
            by[out] = by.get(out, 0) + 1
            return          # the triggering event's own fields were counted with that event
        if kind == "listen":
            return          # counted by kind only
        if kind == "connect" or kind == "flow":
            net = rec.get("net") or {}
            if kind == "connect":
                key = f'{net.get("proto")}/{net.get("verdict")}'
                a.connects[key] = a.connects.get(key, 0) + 1
            dst = net.get("dst") or {}
            if dst.get("scope") not in (None, "loopback"):
                k = (dst.get("addr"), dst.get("port"), dst.get("scope"), dst.get("name"))
                if not _bump(a.dests, k):
                    a.dests_other += 1
        if kind == "flow":
            p = (rec.get("flow") or {}).get("protocol", "unknown")
            a.flows[p] = a.flows.get(p, 0) + 1
        elif kind == "dns":
            q = (rec.get("dns") or {}).get("query")
            if q and not _bump(a.names, q):
                a.names_other += 1
        elif kind == "gpu":
            g = rec.get("gpu") or {}
            gk = g.get("uuid") or str(g.get("index"))
            st = a.gpu.setdefault(gk, {"index": g.get("index"), "uuid": g.get("uuid"), "name": g.get("name"),
                                        "peak_memory_mib": 0, "seconds": 0.0})
            for m in (g.get("used_memory_mib"), g.get("agent_used_memory_mib")):
                if isinstance(m, (int, float)) and m > st["peak_memory_mib"]:
                    st["peak_memory_mib"] = m
            t = _parse_ns(ts)
            pid = (rec.get("proc") or {}).get("pid")
            ch = g.get("change")
            if ch == "acquired":
                a.gpu_open.setdefault((gk, pid), t)
            elif ch == "released":
                since = a.gpu_open.pop((gk, pid), None)
                if since is not None:
                    st["seconds"] += (t - since) / 1e9

    def observe_batch(self, records: list) -> None:
        """observe() for every record of a batch: one call per batch from the pipeline."""
        for r in records:
            self.observe(r)

    def _quiet_forks(self, cid: int) -> int:
        # fork records off: the kernel counted the forks, so the figure stays what the fork
        # records would have made it
        if self.quiet_forks is None:
            return 0
        try:
            return int(self.quiet_forks(cid))
        except Exception:
            return 0

    def _top(self, d: dict, other: int, fields) -> dict:
        items = sorted(d.items(), key=lambda kv: (-kv[1], str(kv[0])))
        top = []
        for k, n in items[: self.top_n]:
            row = dict(zip(fields, k)) if isinstance(k, tuple) else {fields[0]: k}
            row["count"] = n
            top.append(row)
        # past MAX_DISTINCT keys, `other` counts the records of keys not tracked
        return {"distinct": len(d), "other": other, "top": top}

    def finish(self, cid: int, reason: str, t_ns: Optional[int] = None) -> Optional[dict]:
        """The summary record of one agent (state dropped), or None when it left no record."""
        a = self._a.pop(cid, None)
        if a is None:
            return None
        t_ns = t_ns or time.time_ns()
        end = _parse_ns(a.last) if a.last else t_ns
        gpus = []
        for gk, st in a.gpu.items():
            st = dict(st)
            for (k, _pid), since in a.gpu_open.items():
                if k == gk:      # still held when the agent went: count until its last record
                    st["seconds"] += max(0, end - since) / 1e9
            st["seconds"] = round(st["seconds"], 3)
            gpus.append(st)
        body = {
            "reason": reason,
            "first_ts": a.first, "last_ts": a.last,
            "duration_s": round((end - _parse_ns(a.first)) / 1e9, 3) if a.first else 0.0,
            "records": sum(a.kinds.values()),
            "records_by_kind": dict(sorted(a.kinds.items())),
            "processes": {"execs": a.execs, "forks": a.forks + self._quiet_forks(cid),
                          "distinct_pids": len(a.pids)},
            "root": dict(a.root, **(a.root_exit or {"exit_code": None, "signal": None})) if a.root else None,
            "alerts": sum(sum(v.values()) for v in a.alerts.values()),
            "alerts_by_rule": {r: dict(sorted(v.items())) for r, v in sorted(a.alerts.items())},
            "connects_by_proto": dict(sorted(a.connects.items())),
            "flows_by_protocol": dict(sorted(a.flows.items())),
            "destinations": self._top(a.dests, a.dests_other, ("addr", "port", "scope", "name")),
            "dns_names": self._top(a.names, a.names_other, ("name",)),
            "gpu": gpus,
        }
        return {"ts": format_ns(t_ns), "kind": "summary", "node": self.node, "agent": a.ident,
                "summary": body}


def finish_agent(tracer, cid: int, reason: str) -> None:
    """Read out what the kernel still holds for the agent, then emit its summary."""
    tracer.summaries.node = tracer.node
    tracer._read(0)
    held = [sk for sk, (ev, _since) in tracer.enrich.pending.items() if ev.agent_cgroup_id == cid]
    for sk in held:
        tracer._process(tracer.enrich.pending.pop(sk)[0])
    if getattr(tracer, "act", None) is not None:
        tracer._collect_actions(force=True)
    if tracer.engine is not None:
        ident = tracer.agents.known().get(cid) or {}
        tracer._alerts(tracer.engine.flush_agent(cid, ident.get("id", "")))
    tracer._flush()
    rec = tracer.summaries.finish(cid, reason)
    if rec is not None:
        tracer._process(Event("summary", time.time_ns(), rec, 0, cid))
        tracer._flush()


def check_removed(tracer) -> None:
    """Agents whose cgroup directory is gone get their summary (once)."""
    from agenttrace.enrich.cgroups import cgroup2_mount
    mount = cgroup2_mount()
    for cid in tracer.summaries.active():
        ident = tracer.agents.known().get(cid)
        rel = (ident or {}).get("cgroup")
        if rel is None:
            continue
        try:
            import os
            gone = os.stat(mount / rel.lstrip("/")).st_ino != cid
        except FileNotFoundError:
            gone = True
        except OSError:
            continue
        if gone:
            # alerts whose action is still in flight come before the summary that counts
            # them: wait for the act stage by ticks (the reader never blocks on it), 5 at most
            act = getattr(tracer, "act", None)
            idle = getattr(act, "_idle", None)
            waited = tracer.summaries.waiting.get(cid, 0)
            if idle is not None and not idle.is_set() and waited < 5:
                tracer.summaries.waiting[cid] = waited + 1
                continue
            tracer.summaries.waiting.pop(cid, None)
            finish_agent(tracer, cid, "cgroup_removed")


def finish_all(tracer, reason: str) -> None:
    for cid in tracer.summaries.active():
        finish_agent(tracer, cid, reason)
