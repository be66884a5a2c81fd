"""The human view of `agenttrace tail`: one line per event, alerts highlighted.

Everything in a record that an agent controls (argv, comm, exe, DNS names, banners, labels)
goes through `escape()` before it reaches the terminal: control characters (ESC, CR, BS,
the rest of C0 and C1, DEL), bidi overrides and other invisible format characters are
shown as visible `\\xNN` / `\\uNNNN` escapes, so an agent cannot retitle, clear or rewrite
the operator's terminal, nor make one line look like another.
"""
from __future__ import annotations

import shlex
from typing import Any, Iterable, Optional

from agenttrace.sinks.filter import SEVERITIES, SEVERITY_RANK as _SEV_RANK, RecordFilter  # noqa: F401

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape(s: Any) -> str:
    """A string safe to print on a terminal, with every unsafe character made visible."""
    if not isinstance(s, str):
        s = str(s)
    # isprintable() is False for Cc, Cf (bidi, zero-width), Zl, Zp, Cs, Co, Cn and for
    # non-ASCII spaces: exactly the characters that can hide or move text.
    if s.isprintable() and "\\" not in s:
        return s
    out = []
    for ch in s:
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif ch == " " or ch.isprintable():
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def _arg(a: Any) -> str:
    e = escape(a)
    # Quote only what would read ambiguously (spaces, quotes, empty); escapes stay visible.
    return shlex.quote(e) if (not e or any(c in e for c in " '\"`$;|&<>*?()[]{}")) else e


class _Style:
    def __init__(self, color: bool):
        self.on = color

    def __call__(self, text: str, *codes: str) -> str:
        if not self.on or not codes:
            return text
        return f"\x1b[{';'.join(codes)}m{text}\x1b[0m"


DIM, BOLD, RED, GREEN, YELLOW, BLUE, MAGENTA, CYAN = "2", "1", "31", "32", "33", "34", "35", "36"
_KIND_STYLE = {"exec": (CYAN,), "exit": (DIM,), "connect": (BLUE,), "listen": (BLUE,), "dns": (MAGENTA,),
               "flow": (YELLOW,), "gpu": (GREEN,), "device": (GREEN,), "file": (YELLOW,), "lifecycle": (DIM, GREEN),
               "alert": (BOLD, RED)}
_SEV_STYLE = {"critical": ("1", "97", "41"), "high": (BOLD, RED), "medium": (BOLD, YELLOW),
              "low": (YELLOW,), "info": ()}


def _d(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _hostport(e: Any) -> str:
    e = _d(e)
    addr = escape(e.get("addr", "?"))
    port = e.get("port")
    if ":" in addr:
        addr = f"[{addr}]"
    return f"{addr}:{escape(port)}" if port is not None else addr


def _time(ts: Any) -> str:
    # RFC 3339 → HH:MM:SS.mmm (UTC, as in the record); fall back to whatever is there.
    if isinstance(ts, str) and len(ts) >= 23 and ts[10] in "Tt":
        return ts[11:23]
    return escape(ts if ts is not None else "-")[:12].ljust(12)


def _flat(d: dict, prefix: str = "", depth: int = 0) -> Iterable[tuple]:
    """Nested counters as escaped dotted keys: drops.kernel_by_agent.a1=3."""
    for k, v in d.items():
        key = prefix + escape(k)
        if isinstance(v, dict):
            if depth < 3:
                yield from _flat(v, key + ".", depth + 1)
        elif not isinstance(v, list):
            yield key, v
        elif key in _LIST_KEYS:
            # what is attached and watched, in a word each: the line a person checks first
            yield key, ",".join(str(x) for x in v)


_LIST_KEYS = {"probes", "watched"}


def _exec_gist(proc: dict) -> str:
    exe = proc.get("exe") or ""
    args = proc.get("args") or []
    if not isinstance(args, list):
        args = [args]
    shown = " ".join(_arg(a) for a in args)
    if exe:
        return f"{escape(exe)}  {shown}" if shown else escape(exe)
    return shown


def _net_gist(rec: dict, st: _Style) -> str:
    net = _d(rec.get("net"))
    proto = escape(net.get("proto", ""))
    dst = _d(net.get("dst"))
    parts = [proto, "→", _hostport(dst)]
    if dst.get("name"):
        parts.append(f"({escape(dst['name'])})")
    if dst.get("scope"):
        scope = escape(dst["scope"])
        parts.append(st(scope, BOLD) if scope in ("external", "metadata") else scope)
    if net.get("result"):
        parts.append(escape(net["result"]))
    if net.get("verdict") == "blocked":
        parts.append(st("BLOCKED", BOLD, RED))
    return " ".join(p for p in parts if p)


def _gist(rec: dict, st: _Style) -> str:
    kind = rec.get("kind")
    proc = _d(rec.get("proc"))
    if kind == "exec":
        return _exec_gist(proc)
    if kind == "exit":
        s = f"exit {escape(rec.get('exit_code', '?'))}"
        if rec.get("duration_ms") is not None:
            s += f" after {escape(rec['duration_ms'])} ms"
        return s
    if kind == "connect":
        return _net_gist(rec, st)
    if kind == "listen":
        net = _d(rec.get("net"))
        return f"{escape(net.get('proto', ''))} listen {_hostport(net.get('local'))}"
    if kind == "dns":
        d = _d(rec.get("dns"))
        s = f"{escape(d.get('qtype', '?'))} {escape(d.get('query', '?'))} @ {_hostport(d.get('server'))}"
        answers = d.get("answers")
        if isinstance(answers, list) and answers:
            s += " → " + ", ".join(escape(a.get("data", a.get("addr", a)) if isinstance(a, dict) else a)
                                   for a in answers[:4])
            if len(answers) > 4:
                s += f" (+{len(answers) - 4})"
        return s
    if kind == "flow":
        f = _d(rec.get("flow"))
        detail = f.get("detail")
        if isinstance(detail, dict):
            detail = " ".join(f"{escape(k)}={_arg(v)}" for k, v in detail.items())
        elif detail is not None:
            detail = _arg(detail)
        return " ".join(x for x in (st(escape(f.get("protocol", "?")), BOLD), _net_gist(rec, st), detail) if x)
    if kind == "gpu":
        g = _d(rec.get("gpu"))
        return (f"gpu{escape(g.get('index', '?'))} {escape(g.get('name', ''))} "
                f"mem {escape(g.get('used_memory_mib', '?'))}MiB sm {escape(g.get('sm_util_pct', '?'))}%")
    if kind == "device":
        dv = _d(rec.get("device"))
        s = f"dev {escape(dv.get('major', '?'))}:{escape(dv.get('minor', '?'))} {escape(dv.get('access', ''))}"
        if dv.get("verdict") == "blocked":
            s += " " + st("BLOCKED", BOLD, RED)
        elif dv.get("verdict"):
            s += " " + escape(dv["verdict"])
        return s
    if kind == "file":
        fl = _d(rec.get("file"))
        s = (f"{escape(fl.get('op', '?'))} {escape(fl.get('class', '?'))} "
             f"{escape(fl.get('path') or fl.get('raw_path') or '<unreadable>')} ({escape(fl.get('syscall', '?'))})")
        if fl.get("verdict") == "killed":
            s += " " + st("KILLED", BOLD, RED)
        return s
    if kind == "socket":
        so = _d(rec.get("socket"))
        s = f"socket {escape(so.get('family', '?'))}/{escape(so.get('type', '?'))}/{escape(so.get('protocol', '?'))}"
        if so.get("verdict") == "blocked":
            s += " " + st("BLOCKED", BOLD, RED)
        return s
    if kind == "escape":
        e = _d(rec.get("escape"))
        to = _d(e.get("to"))
        who = "moved itself" if e.get("self") else f"moved by {escape(e.get('by_pid', '?'))}"
        s = f"pid {escape(e.get('pid', '?'))} {who} to {escape(to.get('cgroup') or '?')}"
        if e.get("verdict") == "killed":
            s += " " + st("KILLED", BOLD, RED)
        return s
    if kind == "lifecycle":
        extra = " ".join(f"{k}={escape(v)}" for k, v in _flat(
            {k: v for k, v in rec.items() if k not in ("ts", "kind", "node", "agent", "phase")}))
        return f"{escape(rec.get('phase', ''))} {extra}".strip()
    if kind == "alert":
        rule = _d(rec.get("rule"))
        sev = str(rule.get("severity", "info"))
        outcome = escape(rule.get("outcome", ""))
        head = st(f"ALERT {escape(sev).upper()} {escape(rule.get('id', '?'))}", *_SEV_STYLE.get(sev, (BOLD, RED)))
        oc = st(outcome, BOLD, RED) if outcome in ("blocked", "killed") else st(outcome, BOLD)
        s = f"{head} {oc}"
        if rule.get("message"):
            s += f" — {escape(rule['message'])}"
        # What triggered it, in the same words as the event line would use.
        trig = ""
        if isinstance(rec.get("net"), dict) and _d(rec["net"]).get("dst"):
            trig = _net_gist(rec, st)
        elif isinstance(rec.get("dns"), dict):
            trig = escape(_d(rec["dns"]).get("query", ""))
        elif proc.get("exe") or proc.get("args"):
            trig = _exec_gist(proc)
        return f"{s} [{trig}]" if trig else s
    return " ".join(f"{escape(k)}={escape(v)}" for k, v in rec.items() if k not in ("ts", "kind", "node", "agent"))


def render(record: dict, color: bool = True) -> str:
    """One terminal line (no trailing newline) for one §5 record."""
    st = _Style(color)
    kind = str(record.get("kind", "?"))
    agent = _d(record.get("agent"))
    proc = _d(record.get("proc"))
    who = escape(agent.get("id", "-"))
    pc = ""
    if proc:
        pc = f"{escape(proc.get('pid', '?'))}/{escape(proc.get('comm', '?'))}"
    line = " ".join((
        st(_time(record.get("ts")), DIM),
        st(who.ljust(14), BOLD),
        st(escape(kind).ljust(9), *_KIND_STYLE.get(kind, ())),
        pc.ljust(22),
        _gist(record, st),
    ))
    return line.rstrip()


class Filter(RecordFilter):
    """Which records `tail` shows: `sinkfilter.RecordFilter` (agents: glob patterns on agent
    id; kinds; min_severity: alerts at or above it, other events count as `info`; labels)
    plus alerts_only: only `alert` records."""

    __slots__ = ("alerts_only",)

    def __init__(self, agents: Optional[Iterable[str]] = None, kinds: Optional[Iterable[str]] = None,
                 min_severity: Optional[str] = None, alerts_only: bool = False,
                 labels: Optional[dict] = None):
        super().__init__(kinds=kinds, min_severity=min_severity, agents=agents, labels=labels)
        self.alerts_only = alerts_only

    def __call__(self, record: dict) -> bool:
        if self.alerts_only and record.get("kind") != "alert":
            return False
        return RecordFilter.__call__(self, record)

    accepts = __call__
