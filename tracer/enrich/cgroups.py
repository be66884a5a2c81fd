"""cgroup v2: where it is mounted, path/id resolution, and agent identity.

A cgroup's id is the inode number of its directory (what bpf_get_current_cgroup_id returns).
cgroup v2 may be the only hierarchy (/sys/fs/cgroup) or share the machine with v1
(hybrid: /sys/fs/cgroup/unified), so the mount is read from /proc/self/mountinfo.
"""
from __future__ import annotations

import os
import threading
import time
from functools import lru_cache
from pathlib import Path

from agenttrace.enrich.containers import identity as container_identity
from agenttrace.enrich.labels import XATTR_PREFIX, read_xattrs


class CgroupError(Exception):
    pass


def parse_cgroup2_mount(mountinfo: str) -> str | None:
    """The cgroup2 mount point in a /proc/self/mountinfo text (hybrid hosts mount it at
    /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup), None if there is none."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return left.split()[4].replace("\\040", " ")
    return None


@lru_cache(maxsize=1)
def cgroup2_mount() -> Path:
    try:
        with open("/proc/self/mountinfo") as f:
            m = parse_cgroup2_mount(f.read())
    except OSError as e:
        raise CgroupError(f"cannot read /proc/self/mountinfo: {e}") from None
    if m is None:
        raise CgroupError("no cgroup2 filesystem is mounted (mount -t cgroup2 none /sys/fs/cgroup)")
    return Path(m)


def resolve(path: str | os.PathLike) -> Path:
    """Accept a cgroup both relative to the cgroup2 mount (/agents) and as an absolute
    cgroupfs path (/sys/fs/cgroup/agents); return the absolute directory, which must exist."""
    mount = cgroup2_mount()
    p = Path(path)
    if not p.is_absolute():
        p = Path("/") / p
    cand = p if (p == mount or mount in p.parents) else mount / str(p).lstrip("/")
    cand = Path(os.path.normpath(cand))
    if cand != mount and mount not in cand.parents:
        raise CgroupError(f"cgroup path '{path}' escapes the cgroup2 mount {mount}")
    if not (cand / "cgroup.procs").is_file():
        raise CgroupError(f"cgroup '{path}' does not exist (looked for {cand})")
    return cand


def relpath(abs_path: Path) -> str:
    mount = cgroup2_mount()
    rel = os.path.relpath(abs_path, mount)
    return "/" if rel == "." else "/" + rel


def cgroup_id(abs_path: Path) -> int:
    return os.stat(abs_path).st_ino


def find_by_id(cid: int, first=(), limit: int = 50_000) -> Path | None:
    """The cgroup directory whose id is `cid`: the subtrees in `first`, then the whole hierarchy,
    at most `limit` directories (a kernel record names a cgroup only by id when it was never
    attached to: clone3 CLONE_INTO_CGROUP). The directory entry's inode is the id: no stat."""
    seen = 0
    for top in [*first, cgroup2_mount()]:
        stack = [str(top)]
        while stack:
            d = stack.pop()
            try:
                if os.stat(d).st_ino == cid:
                    return Path(d)
                with os.scandir(d) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            if e.inode() == cid:
                                return Path(e.path)
                            stack.append(e.path)
            except OSError:
                continue             # removed meanwhile
            seen += 1
            if seen >= limit:
                return None
    return None


def level(abs_path: Path) -> int:
    rel = relpath(abs_path)
    return 0 if rel == "/" else rel.count("/")


def pid_cgroup(pid: int) -> str | None:
    """The v2 cgroup of a process, relative to the mount ('0::/path' line), or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def procs(abs_path: Path, recursive: bool = True) -> list[int]:
    out = []
    for dirpath, dirnames, filenames in os.walk(abs_path):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
        if not recursive:
            break
    return out


class AgentResolver:
    """Maps the agent cgroup id the kernel reports to the agent's identity.

    Each direct child of a watched cgroup is one agent named after its directory; processes
    directly in the watched cgroup form an agent named after it. Unknown ids trigger one
    rescan of the watched cgroups' children (new agents appear at any time); ids of cgroups
    already removed keep their cached identity, and truly unknown ones get a stable
    placeholder rather than failing the event."""

    def __init__(self, labels: dict | None = None, namer=None, label_refresh_ms: int = 250):
        self._lock = threading.Lock()
        self._watched: dict[int, Path] = {}
        self._agents: dict[int, dict] = {}
        self._labels = labels or {}
        self._namer = namer
        self.on_new = None          # callback(cgroup_id, identity) for each agent discovered
        self.on_notice = None       # callback(code, message): a label was rejected
        self._roots: dict[int, tuple] = {}
        # xattr labels are re-read at most every label_refresh_ms per agent: cgroupfs (kernfs)
        # does not move a directory's ctime on setxattr, so there is no cheaper change test
        self.label_refresh_ns = int(label_refresh_ms * 1_000_000)
        self._src: dict[int, list] = {}     # owner cid -> [abs_path, next_check_ns, base]
        self._rejected_seen: set = set()
        self.labels_rejected = 0

    def watch(self, abs_path: Path, mode: str = "child", namer=None, labels: dict | None = None) -> int:
        """mode "child": each direct child is an agent (named by `namer(rel_path, cgroup_id)`,
        default its directory name); mode "self": the watched cgroup and everything below it
        are one agent."""
        cid = cgroup_id(abs_path)
        with self._lock:
            self._watched[cid] = abs_path
            self._roots[cid] = (mode, namer, labels or {})
            self._add(abs_path, cid, cid)
        self.rescan()
        return cid

    def unwatch(self, cid: int) -> None:
        with self._lock:
            self._watched.pop(cid, None)
            self._roots.pop(cid, None)

    def watched(self) -> dict[int, Path]:
        with self._lock:
            return dict(self._watched)

    def _add(self, abs_path: Path, cid: int, root_cid: int) -> dict:
        mode, namer, labels = self._roots.get(root_cid, ("child", None, {}))
        if mode == "self" and cid != root_cid and root_cid in self._agents:
            ident = self._agents[root_cid]       # everything below is the watched agent
        else:
            rel = relpath(abs_path)
            namer = namer or self._namer
            name = namer(rel, cid) if namer else abs_path.name
            base = {"id": name, "cgroup": rel, "cgroup_id": cid}
            base.update(container_identity(rel))
            for k, v in list(labels.items()) + list(self._labels.items()):
                base.setdefault(k, v)
            self._src[cid] = [abs_path, time.monotonic_ns() + self.label_refresh_ns, base]
            ident = self._with_xattrs(cid, abs_path, base)
        self._agents[cid] = ident
        if self.on_new is not None:
            try:
                self.on_new(cid, ident)
            except Exception:
                pass
        return ident

    def _with_xattrs(self, cid: int, abs_path: Path, base: dict) -> dict:
        """A new identity dict: records already built keep the labels they were made with."""
        ok, bad = read_xattrs(abs_path)
        ident = dict(base)
        for k, v in ok.items():
            ident.setdefault(k, v)      # configured and --label values win over xattrs
        for key, why in bad:
            # counted and reported once per agent, key and reason, not on every re-read
            if (cid, key, why) in self._rejected_seen:
                continue
            self.labels_rejected += 1
            if len(self._rejected_seen) < 10000:
                self._rejected_seen.add((cid, key, why))
                if self.on_notice is not None:
                    try:
                        self.on_notice("label_rejected",
                                       f"agent {base['id']}: xattr {XATTR_PREFIX}{key.strip(chr(39))} rejected: {why}")
                    except Exception:
                        pass
        return ident

    def _refresh(self, cid: int, now: int) -> None:
        src = self._src.get(cid)
        if src is None or now < src[1]:
            return
        src[1] = now + self.label_refresh_ns
        if not os.path.isdir(src[0]):
            del self._src[cid]          # removed: the last identity stays for late records
            return
        old = self._agents.get(cid)
        new = self._with_xattrs(cid, src[0], src[2])
        if new != old:
            self._agents[cid] = new

    def rescan(self) -> None:
        with self._lock:
            roots = list(self._watched.items())
        for root_cid, root in roots:
            try:
                with os.scandir(root) as it:
                    for ent in it:
                        if ent.is_dir(follow_symlinks=False):
                            ino = ent.inode()
                            if ino not in self._agents:
                                with self._lock:
                                    self._add(Path(ent.path), ino, root_cid)
            except OSError:
                continue

    def known(self) -> dict[int, dict]:
        with self._lock:
            return dict(self._agents)

    def agent(self, cid: int) -> dict:
        a = self._agents.get(cid)
        if a is not None and self._src:
            owner = a["cgroup_id"]
            src = self._src.get(owner)
            # _refresh's own test first: on all but one record a second it has nothing to do
            if src is not None and time.monotonic_ns() >= src[1]:
                self._refresh(owner, time.monotonic_ns())
                a = self._agents.get(owner, a)
            elif owner != cid:
                a = self._agents.get(owner, a)
        if a is None:
            self.rescan()
            a = self._agents.get(cid)
            if a is None:
                a = {"id": f"cgroup-{cid}", "cgroup": None, "cgroup_id": cid}
                with self._lock:
                    self._agents[cid] = a
        return a

    def path_of(self, cid: int) -> Path | None:
        a = self.agent(cid)
        if a.get("cgroup") is None:
            return None
        return cgroup2_mount() / a["cgroup"].lstrip("/")


def kill_and_remove(path: Path, timeout: float = 10.0) -> None:
    """Kill every process in `path` and below (cgroup.kill where the kernel has it, else one
    pid at a time), then remove the directories, deepest first. For cgroups this process made:
    `run -- CMD`'s agent cgroup, the demo's sandbox, the tests' and the benchmark's trees.
    Raises OSError if a directory is still busy after `timeout`."""
    import signal
    import time
    path = Path(path)
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    dirs = sorted((Path(dp) for dp, _, _ in os.walk(path)), key=lambda p: -len(p.parts))
    for d in dirs:
        while True:
            pids = procs(d)
            if pids:
                try:
                    (d / "cgroup.kill").write_text("1")
                except OSError:
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


class TempCgroup:
    """A cgroup this process creates and must remove (run -- CMD, tests).

    `shared_parents`: how many of its ancestors are a folder concurrent users share (every `run`
    makes <cgroup2>/agenttrace/<agent>): made if missing, tolerating another user making or
    removing it at the same moment, and removed on the way out when empty, whoever made it — the
    last run out takes it, instead of the first one in leaving it for good."""

    def __init__(self, rel: str, shared_parents: int = 0):
        self.path = cgroup2_mount() / rel.lstrip("/")
        self.created: list[Path] = []
        self.shared = [self.path.parents[i] for i in range(shared_parents)]

    def create(self) -> Path:
        for attempt in range(50):
            try:
                return self._create()
            except FileNotFoundError:
                # a shared parent was removed (empty) by another user between our mkdirs
                if attempt == 49 or not self.shared:
                    raise
                time.sleep(0.01)
        raise AssertionError("unreachable")

    def _create(self) -> Path:
        missing = []
        p = self.path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if d == self.path or d not in self.shared:
                    raise
                continue        # another user made the shared parent at the same moment
            if d not in self.shared:
                self.created.append(d)
        return self.path

    def kill_all(self) -> None:
        kill = self.path / "cgroup.kill"
        if kill.exists() and procs(self.path):
            try:
                kill.write_text("1")
            except OSError:
                for pid in procs(self.path):
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass

    def remove(self, timeout: float = 5.0) -> None:
        kill_and_remove(self.path, timeout)
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                pass
        for d in self.shared:
            try:
                d.rmdir()       # EBUSY/ENOTEMPTY while another user's cgroup is in it: theirs to take
            except OSError:
                break

