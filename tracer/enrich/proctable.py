"""Process table: what agenttrace knows of each process, for attribution and ancestry.

Fed by fork/exec/exit events; processes that existed before start (or whose events were
not seen, like an agent's ancestors outside its cgroup) are read from /proc on demand.
Bounded: least recently used entries are evicted past `max_entries` (evictions counted), so
a fork bomb cannot grow memory without limit.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict, deque

ANCESTRY_DEPTH = 8
# exited processes no ancestry has named, kept this many exits longer (see ProcTable.on_exit)
EXITED_KEEP = 4096
# pids whose look-up found nothing, remembered (ProcTable.get `before`); a storm of them only
# looks up again
GONE_KEEP = 4096


class Proc:
    __slots__ = ("pid", "ppid", "parent", "uid", "comm", "exe", "args", "start_ktime",
                 "cgroup_id", "agent_cgroup_id", "exited", "gpu", "_summary", "_anc", "_anc_gen", "_anc_pids",
                 "exec_id", "parent_exec_id", "kids", "_kid_anc")

    def __init__(self, pid: int, ppid: int = 0, uid: int = 0, comm: str = "", exe: str = "",
                 args: list | None = None, start_ktime: int = 0):
        self.pid = pid
        self.ppid = ppid          # the kernel's parent now (after reparenting: init/subreaper)
        self.parent = ppid        # the process that forked this one, kept for ancestry
        self.uid = uid
        self.comm = comm
        self.exe = exe
        self.args = args or []
        self.start_ktime = start_ktime
        self.cgroup_id = 0
        self.agent_cgroup_id = 0
        self.exited = False
        self.gpu = None
        self._summary = None
        self._anc: list | None = None   # ancestry as of ProcTable generation _anc_gen
        self._anc_gen = -1
        self._anc_pids: frozenset | None = None   # the pids in _anc, built when a child asks
        self.exec_id = make_exec_id(pid, start_ktime)
        self.parent_exec_id: str | None = None
        self.kids = False    # named in some ancestry: its exec must invalidate cached ones
        # (own chain, own summary, chain of a child): the list its children share, see ancestry
        self._kid_anc: tuple | None = None

    def summary(self) -> dict:
        """{pid, comm, exe} for ancestry lists; rebuilt only when comm or exe changed. Shared
        by every record that names this ancestor, so never mutate it."""
        s = self._summary
        if s is None or s["comm"] is not self.comm or s["exe"] is not self.exe or s["exec_id"] is not self.exec_id:
            s = self._summary = {"pid": self.pid, "comm": self.comm, "exe": self.exe, "exec_id": self.exec_id}
        return s

    def record(self) -> dict:
        return {"pid": self.pid, "ppid": self.ppid, "uid": self.uid, "comm": self.comm,
                "exe": self.exe, "args": self.args, "exec_id": self.exec_id,
                "parent_exec_id": self.parent_exec_id}


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def readlink_exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:16]
    except OSError:
        return "0" * 16


BOOT_ID = _boot_id()


def make_exec_id(pid: int, start_ns: int) -> str:
    """One process image on this node's boot: boot id, pid, and when the image began (ns).
    Pids are reused, (pid, start) within one boot is not, and the boot id keeps ids from
    different boots apart, so ids stay unique when agenttrace restarts."""
    return f"{BOOT_ID}-{pid}-{start_ns}"


def from_proc(pid: int) -> Proc | None:
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # comm may contain spaces and parentheses: it ends at the last ')'
    lp, rp = stat.find(b"("), stat.rfind(b")")
    comm = stat[lp + 1:rp].decode("utf-8", "backslashreplace")
    fields = stat[rp + 2:].split()
    ppid = int(fields[1])
    start_ticks = int(fields[19])
    cmdline = _read(f"/proc/{pid}/cmdline") or b""
    args = [a.decode("utf-8", "backslashreplace") for a in cmdline.rstrip(b"\0").split(b"\0")] if cmdline else []
    uid = 0
    status = _read(f"/proc/{pid}/status") or b""
    for line in status.split(b"\n"):
        if line.startswith(b"Uid:"):
            uid = int(line.split()[1])
            break
    # /proc start time is boot-based ticks; CLOCK_MONOTONIC differs from boottime only by
    # suspended time, which is good enough for a duration of a process we did not see start
    p = Proc(pid, ppid, uid, comm, readlink_exe(pid) or "", args,
             start_ktime=start_ticks * (1_000_000_000 // _CLK_TCK))
    return p


class ProcTable:
    def __init__(self, max_entries: int = 65536):
        self.max_entries = max_entries
        self._t: OrderedDict[int, Proc] = OrderedDict()
        self.evictions = 0
        # Bumped whenever something on an ancestry chain may have changed: an entry replaced
        # (pid reuse), removed or evicted, a pid a chain stopped at (a hole) filled in, or an
        # exec in a process that is some process's ancestor (`kids`). A cached ancestry is
        # valid only while the generation it was taken at is current. A new child or an
        # exec of a process nobody descends from changes no chain, so an exec storm's fork,
        # exec and exit records share one walk instead of one each.
        self._gen = 0
        self._holes: set[int] = set()
        # pid -> (creator, fork ktime, flags) | None: the kernel's creator chain (kernel/forks.py),
        # for processes forked while fork records are off; None when there is no kernel table
        self.fork_lookup = None
        # exited processes no chain named when they exited, oldest first (on_exit)
        # (two deques, not one of pairs: a tuple per exit is one more object for every
        # garbage collection to walk until the entry goes)
        self._exited: "deque[Proc]" = deque()
        self._exited_ids: "deque[str]" = deque()    # each one's exec_id when it exited
        self.forgotten = 0
        # pid -> CLOCK_MONOTONIC ns taken before a look-up (kernel fork entry, /proc) that found
        # nothing: the process holding the pid at any earlier time had gone by then (get)
        self._gone: dict[int, int] = {}
        self.gone_hits = 0

    def __len__(self) -> int:
        return len(self._t)

    def _put(self, p: Proc) -> Proc:
        old = self._t.get(p.pid)
        if old is None:
            if p.pid in self._holes:
                self._holes.discard(p.pid)
                self._gen += 1
        elif old is not p or p.kids:
            self._gen += 1
        self._t[p.pid] = p
        self._t.move_to_end(p.pid)
        while len(self._t) > self.max_entries:
            self._t.popitem(last=False)
            self.evictions += 1
            self._gen += 1
        return p

    def peek(self, pid: int) -> Proc | None:
        return self._t.get(pid)

    @property
    def generation(self) -> int:
        """Changes whenever a cached ancestry may have (see _gen): what a copy of one is valid for."""
        return self._gen

    def get(self, pid: int, before: int = 0) -> Proc | None:
        """The table's entry for `pid`, else one built from the kernel's fork entry or /proc.
        `before`: the kernel time (CLOCK_MONOTONIC ns) of the record asking. A process we never
        saw start that has exited by the time its records are read (the reader behind a storm,
        its exec record lost) is found nowhere, and each of its records paid a map look-up and
        a failed /proc open for it, two syscalls, making the reader slower just when it is
        behind (a 2-core connect storm: 40% of the tracer's CPU, 2 look-ups per connect). A
        look-up that found nothing at T says so for every record from before T, exactly: the
        process that made it had gone by T, and one that takes the pid later is newer than T."""
        p = self._t.get(pid)
        if p is not None or pid <= 0:
            return p
        gone = self._gone
        if before:
            t = gone.get(pid)
            if t is not None and before < t:
                self.gone_hits += 1
                return None
        asked = time.monotonic_ns()
        if self.fork_lookup is not None:
            p = self._from_fork_entry(pid)
        if p is None:
            p = from_proc(pid)
            if p is not None:
                self._put(p)
                if p.ppid:
                    par = self.get(p.ppid)
                    p.parent_exec_id = par.exec_id if par else None
        if p is None:
            if len(gone) >= GONE_KEEP and pid not in gone:
                gone.clear()
            gone[pid] = asked
        return p

    def bootstrap(self, pids) -> int:
        n = 0
        for pid in pids:
            if pid not in self._t and self.get(pid) is not None:
                n += 1
        return n

    def _from_fork_entry(self, pid: int) -> Proc | None:
        """A process forked in scope that never exec'd (or whose exec we have not read), built
        as its fork record would have built it: same creator, same fork time, same exec_id.
        Fork-only creators are built the same way, nearest ANCESTRY_DEPTH of them, without
        recursion: an agent's chain of nested forks cannot exhaust the stack."""
        chain = []
        cur = pid
        while len(chain) <= ANCESTRY_DEPTH:
            ent = self.fork_lookup(cur)
            if ent is None:
                break
            chain.append((cur, ent))
            cur = ent[0]
            if not cur or cur in self._t:
                break
        if not chain:
            return None
        top_creator = chain[-1][1][0]
        if top_creator and len(chain) <= ANCESTRY_DEPTH and top_creator not in self._t:
            self.get(top_creator)           # no entry of its own: /proc, or unknown
        p = None
        for cpid, (creator, ktime, _flags) in reversed(chain):
            par = self._t.get(creator) if creator else None
            uid, comm = (par.uid, par.comm) if par is not None else (0, "")
            live = from_proc(cpid)
            if live is not None:
                uid, comm = live.uid, live.comm     # still running: its own name (prctl may rename)
            # as on_fork does, but only with what is already in the table
            p = Proc(cpid, creator, uid, comm, par.exe if par else "", list(par.args) if par else [],
                     start_ktime=ktime)
            p.parent_exec_id = par.exec_id if par else None
            self._put(p)
        return p

    def on_fork(self, parent_pid: int, child_pid: int, ktime: int, uid: int, comm: str) -> Proc:
        parent = self.get(parent_pid)
        child = Proc(child_pid, parent_pid, uid, comm, parent.exe if parent else "",
                     list(parent.args) if parent else [], start_ktime=ktime)
        child.parent_exec_id = parent.exec_id if parent else None
        return self._put(child)

    def on_exec(self, pid: int, ppid: int, uid: int, comm: str, exe: str, args: list,
                ktime: int, creator: int = 0) -> Proc:
        p = self._t.get(pid)
        if p is not None and (p.exited or (creator and self._forked_since(p))):
            # not a new image of that process: another process on its pid (an exited one
            # cannot exec). Kept, it would lend this one its creator, start and exit state
            p = None
        if p is None:
            p = Proc(pid, ppid, uid, comm, exe, args, start_ktime=ktime)
            # an exec we saw without its fork: the kernel's creator when it saw the fork
            # (fork records off), else (a process older than us) the current parent
            if creator:
                p.parent = creator
            if p.parent:
                par = self.get(p.parent)
                p.parent_exec_id = par.exec_id if par else None
                return self._put(p)     # the fields below are the ones it was built with
            p.parent = ppid
            p._anc_gen = -1
            return self._put(p)
        else:
            # a new image in the same process: a new id; the parent link stays the creator's
            p.exec_id = make_exec_id(pid, ktime)
        p.ppid = ppid
        if not p.parent:
            p.parent = ppid
            p._anc_gen = -1     # its own chain starts now
        p.uid, p.comm, p.exe, p.args = uid, comm, exe, args
        return self._put(p)

    def _forked_since(self, p: Proc) -> bool:
        """Whether the kernel saw `p.pid` forked after `p` began: its exit record was lost (a
        full ring, the agent's rate limit) and the pid went to a process forked in scope."""
        look = self.fork_lookup
        if look is None:
            return False
        try:
            ent = look(p.pid)
        except Exception:
            return False
        return ent is not None and ent[1] > p.start_ktime

    def on_exit(self, pid: int) -> Proc | None:
        """An exited process stays while something may still ask for it: a child whose
        records come after the exit (its exec names it as creator), a late record of its
        own. One that no ancestry has named (`kids`) is forgotten EXITED_KEEP exits later,
        unless a chain named it meanwhile or its pid was reused. An exec storm's programs
        are such leaves: before, each kept its ~1 KB entry until the table's LRU bound
        (65,536 entries, ~65 MB of the tracer's RSS) pushed it out. Forgetting a leaf
        changes no cached chain (none holds it), so the generation stays."""
        p = self._t.get(pid)
        if p is not None:
            p.exited = True
            if not p.kids:
                q, ids = self._exited, self._exited_ids
                q.append(p)
                ids.append(p.exec_id)
                if len(q) > EXITED_KEEP:
                    old, xid = q.popleft(), ids.popleft()
                    t = self._t
                    # the same image still (a reused pid's exec in place renews exec_id)
                    if not old.kids and old.exec_id is xid and t.get(old.pid) is old:
                        del t[old.pid]
                        self.forgotten += 1
        return p

    def forget(self, pid: int) -> None:
        if self._t.pop(pid, None) is not None:
            self._gen += 1

    def ancestry(self, pid: int, depth: int = ANCESTRY_DEPTH) -> list[dict]:
        """Creator chain, nearest first: who forked whom, even after a parent exited.

        The full-depth chain is the cached list itself, shared by every record of the process
        while it is valid (an exec storm's exec and exit): no copy per record. Nothing
        downstream (engine, CEL, sinks, OCSF, summaries, activity, sshconfig, report) mutates a
        record's ancestry, and the table never changes a list it handed out: a changed chain
        is a new list."""
        p = self._t.get(pid)
        if p is not None and p._anc_gen == self._gen and depth == ANCESTRY_DEPTH:
            return p._anc
        out = []
        seen = {pid}
        nxt = p.parent if p else 0
        while nxt and nxt not in seen and len(out) < depth:
            seen.add(nxt)
            a = self.get(nxt)
            if a is None:
                if len(self._holes) >= 4096:
                    self._holes.clear()
                    self._gen += 1      # forgotten holes can no longer invalidate: do it now
                self._holes.add(nxt)
                break
            a.kids = True
            out.append(a.summary())
            if a._anc_gen == self._gen and depth == ANCESTRY_DEPTH:
                # the rest of the chain is the ancestor's own, still valid
                anc = a._anc
                if len(out) == 1:
                    # the usual case (a new child of a known parent): the parent's chain,
                    # which holds no pid twice and not the parent's own, is taken whole
                    # unless it names this pid (a reused pid looking at its old self)
                    pids = a._anc_pids
                    if pids is None:
                        pids = a._anc_pids = frozenset([s["pid"] for s in anc])
                    if pid not in pids:
                        # siblings (a storm's children of one parent) share one list: built
                        # from the same chain and the same summary it is the same chain, and
                        # the tuple holds both, so neither id can be another object's
                        kid = a._kid_anc
                        if kid is not None and kid[0] is anc and kid[1] is out[0]:
                            out = kid[2]
                        else:
                            out += anc[:depth - 1]
                            a._kid_anc = (anc, out[0], out)
                        break
                for s in anc:
                    if len(out) >= depth or s["pid"] in seen:
                        break
                    seen.add(s["pid"])
                    out.append(s)
                break
            nxt = a.parent
        if p is not None and depth == ANCESTRY_DEPTH:
            p._anc, p._anc_gen, p._anc_pids = out, self._gen, None    # after any lookups above bumped it
        return out
