"""Escape records: an agent process moved to a cgroup outside the watched subtree
(probes/escape.c), and the kernel's membership table seeded with the processes already in a
watched cgroup when it is watched."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from agenttrace.kernel import wire as E
from agenttrace.session.event import Event

ESCAPE_RULE = "escape-cgroup-move"


def _inside(path: str, watched: Iterable[str]) -> bool:
    p = path.rstrip("/") or "/"
    for w in watched:
        w = w.rstrip("/") or "/"
        if w == "/" or p == w or p.startswith(w + "/"):
            return True
    return False


def escape_event(enricher, o: E.Escape):
    """The record for a kernel escape report, or None for a move that stays inside."""
    from agenttrace.enrich.cgroups import find_by_id, relpath
    h = o.h
    dst = E.cstr(o.dst_path)
    self_move = bool(o.flags & E.ESC_SELF)
    roots = [Path(p) for p in enricher.agents.watched().values()]
    watched = [relpath(p) for p in roots]
    if o.flags & E.ESC_AT_FORK:
        # born elsewhere (clone3 CLONE_INTO_CGROUP): the kernel knows only the cgroup's id. A
        # cgroup that is gone already cannot be shown to be inside, so it counts as outside.
        found = find_by_id(o.dst_cgroup_id, roots)
        dst = relpath(found) if found is not None else ""
        if found is not None and _inside(dst, watched):
            return None
    if not self_move and dst and _inside(dst, watched):
        return None              # moved between cgroups of the watched subtree
    rec, t = enricher._base("escape", h)
    proc = dict(enricher._proc(h))
    if o.moved_tgid != h.tgid:
        p = enricher.procs.get(o.moved_tgid)
        proc = p.record() if p is not None else {"pid": o.moved_tgid, "ppid": 0, "uid": 0, "comm": "",
                                                 "exe": "", "args": []}
        proc["ancestry"] = enricher.procs.ancestry(o.moved_tgid)
    if o.flags & E.ESC_KILLED:
        proc["killed_in_kernel"] = True
    rec["proc"] = proc
    rec["escape"] = {
        "pid": o.moved_tgid, "by_pid": o.writer_tgid, "self": self_move,
        "how": ("clone_into_cgroup" if o.flags & E.ESC_AT_FORK else
                "exec_outside" if o.flags & E.ESC_AT_EXEC else "cgroup_procs"),
        "to": {"cgroup": dst or None, "cgroup_id": o.dst_cgroup_id or None},
        "verdict": "killed" if o.flags & E.ESC_KILLED else "allowed",
    }
    return Event("escape", t, rec, o.moved_tgid, h.agent_cgroup_id)


def seed_members(probes, agent_of: dict) -> int:
    """Tell the kernel which processes are agents' (pid -> agent cgroup id) at watch time:
    processes that entered before the probes were attached have no fork it saw."""
    try:
        t = probes["agent_tasks"]
    except KeyError:
        return 0
    n = 0
    for pid, agent in agent_of.items():
        t[t.Key(pid)] = t.Leaf(agent)
        n += 1
    return n


def members(watched: Path) -> dict:
    """pid -> agent cgroup id for the processes in a watched cgroup now."""
    from agenttrace.enrich.cgroups import cgroup_id, procs
    out = {}
    try:
        wid = cgroup_id(watched)
        for pid in procs(watched, recursive=False):
            out[pid] = wid
        for child in watched.iterdir():
            if (child / "cgroup.procs").exists():
                cid = cgroup_id(child)
                for pid in procs(child):
                    out[pid] = cid
    except OSError:
        pass
    return out
