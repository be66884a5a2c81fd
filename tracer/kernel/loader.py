"""Load the probes (one BCC compile unit), attach them, and manage their maps.

Tracepoint programs attach themselves when BCC loads them. cgroup programs (connect/sendmsg
hooks, skb and device hooks) are attached to each watched cgroup through BPF links: a link
goes away with the last fd that holds it, so a crashed tracer never leaves hooks behind
unless they were pinned on purpose (daemon fail-closed mode).
"""
from __future__ import annotations

import ctypes as C
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from agenttrace.kernel import btf as btf
from agenttrace.enrich.cgroups import cgroup_id, level
from agenttrace.paths import probes_dir

TRACEFS = Path("/sys/kernel/tracing")

# attach types (uapi enum bpf_attach_type)
CGROUP_INET_INGRESS, CGROUP_INET_EGRESS, CGROUP_SOCK_OPS, CGROUP_DEVICE = 0, 1, 3, 6
CGROUP_INET_SOCK_CREATE = 2
CGROUP_INET4_CONNECT, CGROUP_INET6_CONNECT = 10, 11
CGROUP_UDP4_SENDMSG, CGROUP_UDP6_SENDMSG = 14, 15
BPF_F_ALLOW_MULTI = 2

# feature -> (source file in probes/, [(cgroup program, prog type name, attach type)]).
# Tracepoint programs need no entry: BCC attaches TRACEPOINT_PROBE/RAW_TRACEPOINT_PROBE itself.
FEATURES: dict[str, tuple[str, list[tuple[str, str, int]]]] = {
    # agent processes leaving the watched subtree (needs "proc": its BTF offsets, and its fork
    # and exit programs run escape's work); before proc.c, which calls its helpers
    "escape": ("escape.c", []),
    "proc": ("proc.c", []),
    "net": ("net.c", [
        ("at_connect4", "CGROUP_SOCK_ADDR", CGROUP_INET4_CONNECT),
        ("at_connect6", "CGROUP_SOCK_ADDR", CGROUP_INET6_CONNECT),
        ("at_sendmsg4", "CGROUP_SOCK_ADDR", CGROUP_UDP4_SENDMSG),
        ("at_sendmsg6", "CGROUP_SOCK_ADDR", CGROUP_UDP6_SENDMSG),
    ]),
    "listen": ("listen.c", [
        ("at_sockops", "SOCK_OPS", CGROUP_SOCK_OPS),
    ]),
    # flow, tls, dns and icmp run inside skb.c's one program per direction (SKB_PROGRAMS);
    # flow lists them, being what most sets have, so the metrics name them under it
    "flow": ("flow.c", [
        ("at_skb_egress", "CGROUP_SKB", CGROUP_INET_EGRESS),
        ("at_skb_ingress", "CGROUP_SKB", CGROUP_INET_INGRESS),
    ]),
    # ClientHello server names against the rules' forbidden names (needs "flow": it marks a
    # dropped flow in flow.c's state); loaded only where a rule blocks names (session start)
    "tls": ("tls.c", []),
    "dns": ("dns.c", []),
    # learns the addresses DNS answers give for allowed names (needs "net": its maps); loaded
    # only where an allow-list is configured (session start decides)
    "egress": ("egress.c", [
        ("at_egress_learn", "CGROUP_SKB", CGROUP_INET_INGRESS),
    ]),
    # ICMP echo from agent sockets as connect records, under the destination policy (needs "net")
    "icmp": ("icmp.c", []),
    # socket fencing: raw IP sockets (and whatever else the fence names) per agent
    "sock": ("sock.c", [
        ("at_sock_create", "CGROUP_SOCK", CGROUP_INET_SOCK_CREATE),
    ]),
    # the socket fence for families sock_create never sees (packet, netlink, vsock...): the
    # socket() syscall tracepoints, so like `files` not a default (needs "sock": its maps)
    "packet": ("packet.c", []),
    "device": ("device.c", [
        ("at_device_check", "CGROUP_DEVICE", CGROUP_DEVICE),
    ]),
    # syscall tracepoints on opens/renames/links of ssh files: the one feature that costs
    # every task on the machine something (the slow syscall path), so not a default; see
    # the README's measured costs
    "files": ("files.c", []),
}
# The packet concerns skb.c's programs run (probes/skb.c; the order there: tls, icmp, dns, flow),
# and which program each direction needs: (program, attach type, the features that use it).
# With flow on they are flow's programs above; without it the loader adds the ones needed.
SKB_FILE = "skb.c"
SKB_PROGRAMS = (("at_skb_egress", CGROUP_INET_EGRESS, ("flow", "tls", "dns", "icmp")),
                ("at_skb_ingress", CGROUP_INET_INGRESS, ("flow", "dns")))
# Programs reached only by tail call: feature -> [(prog array, index, program, prog type,
# attach type of the caller: a tail call's target must match it)].
TAIL_CALLS: dict[str, list[tuple[str, int, str, str, int]]] = {
    "egress": [("egress_progs", 0, "at_egress_rr", "CGROUP_SKB", -1)],
    # classification and verdict of a flow capture, apart from its reassembly (probes/flow.c)
    "flow": [("flow_egress_next", 0, "at_flow_decide_egress", "CGROUP_SKB", CGROUP_INET_EGRESS),
             ("flow_ingress_next", 0, "at_flow_decide_ingress", "CGROUP_SKB", CGROUP_INET_INGRESS),
             ("flow_egress_next", 1, "at_flow_finish_egress", "CGROUP_SKB", CGROUP_INET_EGRESS),
             ("flow_ingress_next", 1, "at_flow_finish_ingress", "CGROUP_SKB", CGROUP_INET_INGRESS)],
}
# Raw tracepoint programs with names of their own (a tracepoint another feature already uses
# through BCC's RAW_TRACEPOINT_PROBE): feature -> [(tracepoint, program)]. escape's exec check
# is one only where proc.c's exec tracepoint, which runs it otherwise, cannot be pinned
# (Probes.escape_exec_own_program).
RAW_TRACEPOINTS: dict[str, list[tuple[str, str]]] = {
    "escape": [("sched_process_exec", "at_esc_exec")],
}
# syscall tracepoints files.c uses besides sys_enter_openat (present everywhere); each is
# compiled only where tracefs has it (arm64 has no open, creat, rename or link)
FILE_SYSCALLS = ("openat2", "open", "creat", "renameat2", "renameat", "rename", "linkat", "link")
# Tracepoint programs pinned with the cgroup links (fail-closed), per feature: proc.c's exec
# program (exec kills; with escape also its exec check), and with escape the programs that run
# its work (probes/escape.c at_esc_forked, at_esc_exited) and its own cgroup_attach_task.
PINNED_RAW_TRACEPOINTS = {"escape": ("sched_process_fork", "sched_process_exit")}
# The file and packet-socket kills are decided in syscall tracepoints (probes/files.c before its
# record is written, packet.c before the rate limit), so pinned they go on killing while no tracer
# reads: a tracer killed by the agent is not a way to read the ssh keys.
PINNED_TRACEPOINTS = {"proc": ("sched:sched_process_exec",), "escape": ("cgroup:cgroup_attach_task",),
                      "files": ("syscalls:sys_enter_openat", "syscalls:sys_exit_openat")
                      + tuple(f"syscalls:sys_enter_{n}" for n in FILE_SYSCALLS),
                      "packet": ("syscalls:sys_enter_socket", "syscalls:sys_exit_socket")}
DEFAULT_FEATURES = ("proc", "net", "listen", "flow", "dns", "icmp", "sock", "escape")
OPTIONAL_FEATURES = ("files", "packet")   # run/tail --files, run --packet, the daemon config's probes:


def file_syscall_flags(tracefs: Path) -> list[str]:
    return [f"-DAT_HAVE_SYS_{name.upper()}" for name in FILE_SYSCALLS
            if (tracefs / "events" / "syscalls" / f"sys_enter_{name}").is_dir()]


class ProbeError(Exception):
    pass


def _btf_offsets() -> dict[str, int]:
    """btf.probe_offsets(), parsed once per kernel build: reading the whole BTF in Python was
    ~0.5 s of every start (docs/STARTUP.md)."""
    from agenttrace.kernel import probecache
    u = os.uname()
    try:
        size = str(btf.VMLINUX.stat().st_size)
    except OSError:
        size = "none"        # probe_offsets raises the error that says so

    def compute():
        try:
            return btf.probe_offsets()
        finally:
            btf.kernel_btf.cache_clear()     # the parsed BTF is not needed after this
    return probecache.memo("btf", [u.release, u.version, size, repr(sorted(btf.PROBE_FIELDS.items())),
                                   repr(sorted(btf.OPTIONAL_FIELDS.items()))], compute)


_MADV_PAGEOUT = 21    # Linux 5.4+


def release_compiler_memory() -> int:
    """Give back what compiling the probes left resident; returns the mappings paged out.

    BCC compiles in-process with clang/LLVM: ~60 MB of heap freed but kept by malloc, and
    ~80 MB of libLLVM/libclang pages touched once. Nothing compiles again after load (rule
    reloads only rewrite maps), so the heap is trimmed and those clean file pages are paged
    out; a later use would fault them back in from the page cache. Peak RSS (the compile
    itself) is unchanged; the daemon's steady-state RSS drops by about 100 MB."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.malloc_trim(0)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    n = 0
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return 0
    for line in maps:
        parts = line.split(None, 5)
        if len(parts) < 6 or not ("/libLLVM" in parts[5] or "/libclang" in parts[5]):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if madvise(lo, hi - lo, _MADV_PAGEOUT) == 0:   # EINVAL before 5.4: nothing lost
            n += 1
    return n


def bcc_in_process() -> bool:
    """BCC compiles and loads in this process: asked for (AGENTTRACE_BCC_INPROCESS=1), or where
    the mmap ring reader cannot run (not x86-64) and BCC's reader, with its objects, is used."""
    from agenttrace.kernel import ringbuf
    return os.environ.get("AGENTTRACE_BCC_INPROCESS") == "1" or not ringbuf.supported()


def ensure_tracefs() -> Path:
    """tracefs may not be mounted (docs/ARCHITECTURE.md §4); BCC needs it to attach tracepoints."""
    if (TRACEFS / "events").is_dir():
        return TRACEFS
    legacy = Path("/sys/kernel/debug/tracing")
    if (legacy / "events").is_dir():
        return legacy
    TRACEFS.mkdir(parents=True, exist_ok=True)
    rc = os.system(f"mount -t tracefs tracefs {TRACEFS} 2>/dev/null")
    if rc != 0 or not (TRACEFS / "events").is_dir():
        raise ProbeError(f"tracefs is not mounted and mounting it at {TRACEFS} failed")
    return TRACEFS


def tracepoint_has_field(tracefs: Path, category: str, event: str, fieldname: str) -> bool:
    try:
        fmt = (tracefs / "events" / category / event / "format").read_text()
    except OSError:
        return False
    return re.search(rf"field:[^;]*\b{re.escape(fieldname)}\b", fmt) is not None


def _kernel_before(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return bool(m) and (int(m.group(1)), int(m.group(2))) < (major, minor)


_libbpf = None


def _lib():
    global _libbpf
    if _libbpf is None:
        try:
            _libbpf = C.CDLL("libbpf.so.1", use_errno=True)
        except OSError:
            _libbpf = C.CDLL("libbpf.so.0", use_errno=True)
        _libbpf.bpf_link_create.argtypes = [C.c_int, C.c_int, C.c_int, C.c_void_p]
        _libbpf.bpf_link_create.restype = C.c_int
        _libbpf.bpf_obj_pin.argtypes = [C.c_int, C.c_char_p]
        _libbpf.bpf_obj_pin.restype = C.c_int
        _libbpf.bpf_raw_tracepoint_open.argtypes = [C.c_char_p, C.c_int]
        _libbpf.bpf_raw_tracepoint_open.restype = C.c_int
    return _libbpf


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    fd = _lib().bpf_link_create(prog_fd, target_fd, attach_type, None)
    if fd < 0:
        err = -fd if fd < -1 else C.get_errno()
        raise ProbeError(f"attaching a cgroup program failed: {os.strerror(err)}")
    return fd


@dataclass
class _Attachment:
    cgroup_path: Path
    cgroup_id: int
    link_fds: list[int] = field(default_factory=list)
    pinned: list[Path] = field(default_factory=list)


def _is_link(fd: int) -> bool:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return target.startswith("anon_inode:") and "bpf_link" in target


def pin_object(fd: int, path: Path) -> None:
    rc = _lib().bpf_obj_pin(fd, str(path).encode())
    if rc < 0:
        err = -rc if rc < -1 else C.get_errno()
        raise ProbeError(f"pinning {path} failed: {os.strerror(err)}")


class Probes:
    """The loaded BPF object."""

    def __init__(self, features=DEFAULT_FEATURES, ringbuf_pages: int = 4096,
                 extra_cflags: list[str] | None = None):
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ProbeError(f"unknown probe feature(s): {', '.join(sorted(unknown))}")
        if "egress" in features and "net" not in features:
            raise ProbeError("probe feature 'egress' needs 'net' (the connect hooks it feeds)")
        if "icmp" in features and "net" not in features:
            raise ProbeError("probe feature 'icmp' needs 'net' (the destination policy it applies)")
        if "packet" in features and "sock" not in features:
            raise ProbeError("probe feature 'packet' needs 'sock' (the socket fence map it reads)")
        if "tls" in features and "flow" not in features:
            raise ProbeError("probe feature 'tls' needs 'flow' (the per-flow state it marks)")
        if "escape" in features and "proc" not in features:
            raise ProbeError("probe feature 'escape' needs 'proc' (its BTF offsets)")
        self.features = tuple(features)
        self.ringbuf_pages = ringbuf_pages
        self.extra_cflags = list(extra_cflags or [])
        self.bpf = None
        self.cache_hit = False              # the compiled probes came from probecache's cache
        self.prefetched = None              # a prefetch.ProbePrefetch for load() to adopt
        self._cgroup_funcs: list[tuple[object, int]] = []
        self._raw_tp_fds: list[int] = []
        self._raw_tp_names: list[str] = []
        self._raw_pins: list[Path] = []
        self._attached: dict[int, _Attachment] = {}
        self.pin_dir: Path | None = None
        self.heartbeat = None               # egress.Heartbeat once pinned (fail-closed)
        self.fail_closed_grace_s = 5.0

    def source(self) -> str:
        """The compile unit: common.h, then each feature's file in order.

        BCC rewrites map calls (`events.ringbuf_reserve`, `m.lookup`) and generates tracepoint
        argument structs only in its main text, not in #included files, so the files are laid
        one after another here; #line directives keep compiler errors pointing at the real
        file and line. Only agenttrace.h (plain structs) is #included."""
        d = probes_dir()
        parts = []
        # FEATURES order, not the caller's: later files use maps earlier ones declare
        ordered = [f for f in FEATURES if f in self.features]
        files = [d / "common.h"] + [d / FEATURES[f][0] for f in ordered]
        if any(f in self.features for _p, _a, feats in SKB_PROGRAMS for f in feats):
            files.append(d / SKB_FILE)     # last: it calls every packet concern's function
        for path in files:
            parts.append(f'#line 1 "{path}"\n{path.read_text()}\n')
        return "".join(parts)

    def cflags(self) -> list[str]:
        tracefs = ensure_tracefs()
        # -w: the distro headers may be older than the kernel; their warnings are noise to users
        flags = ["-w", f"-I{probes_dir()}", f"-DAT_RINGBUF_PAGES={self.ringbuf_pages}"]
        # FEATURES order, as source() lays the files: the compiled-object cache is keyed by the
        # flags, so one feature set given in another order must not compile (3-6 s) again
        for feat in [f for f in FEATURES if f in self.features]:
            flags.append(f"-DAT_WITH_{feat.upper()}")
        for name, off in _btf_offsets().items():
            flags.append(f"-D{name}={off}")
        if "files" in self.features:
            flags += file_syscall_flags(tracefs)
        if tracepoint_has_field(tracefs, "sched", "sched_process_exit", "group_dead"):
            flags.append("-DAT_HAVE_GROUP_DEAD")
        if self.escape_exec_own_program():
            flags.append("-DAT_ESC_EXEC_PROG")
        if _kernel_before(6, 10):
            # cgroup_skb programs may call bpf_get_current_* only from 6.10 on; older kernels
            # build the skb probes without them and attribute by socket cookie
            flags.append("-DAT_SKB_NO_CURRENT")
        return flags + self.extra_cflags

    def escape_exec_own_program(self) -> bool:
        """escape's exec check as a raw tracepoint of its own, as it was before it ran inside
        proc.c's exec tracepoint: where that tracepoint is attached without a BPF link, which
        alone can be pinned (BCC's own attach; kernels before 5.15 have no perf links)."""
        return "escape" in self.features and (bcc_in_process() or _kernel_before(5, 15))

    def _raw_tracepoints(self, feat: str) -> list[tuple[str, str]]:
        if feat == "escape" and not self.escape_exec_own_program():
            return []
        return RAW_TRACEPOINTS.get(feat, [])

    def load(self) -> None:
        if os.geteuid() != 0:
            raise ProbeError("agenttrace must run as root to load eBPF programs")
        if bcc_in_process():
            return self._load_bcc()
        from agenttrace.kernel import bpfobj, bpfsys, probecache
        src, cflags = self.source(), self.cflags()
        # a prefetch (kernel/prefetch.py) of these very probes, verified while the session set up
        pre, self.prefetched = self.prefetched, None
        taken = None
        try:
            taken = pre.take(src, cflags) if pre is not None else None
            if taken is not None:
                self.cache_hit = taken[1]
            else:
                obj, self.cache_hit = probecache.compiled(src, cflags)
        except probecache.CompileError as e:
            raise ProbeError(f"compiling probes ({', '.join(self.features)}) failed: {e}") from None
        try:
            self.bpf = taken[0] if taken is not None else bpfobj.LoadedObject(obj, ensure_tracefs())
            self.bpf.preload(self._wanted_programs(lambda ptype: bpfsys.PROG_TYPES[ptype]))
            self.bpf.autoload()
        except (bpfsys.BpfError, KeyError) as e:
            raise ProbeError(f"loading probes ({', '.join(self.features)}) failed: {e}") from None
        self._load_programs(lambda ptype: bpfsys.PROG_TYPES[ptype], bpfsys.BpfError)

    def _wanted_programs(self, prog_type) -> list[tuple[str, int, int]]:
        """Every program this feature set loads: (name, prog type, attach type)."""
        out = []
        for name in self.bpf._obj["programs"]:
            if name.startswith("tracepoint__"):
                out.append((name, prog_type("TRACEPOINT"), -1))
            elif name.startswith("raw_tracepoint__"):
                out.append((name, prog_type("RAW_TRACEPOINT"), -1))
        for feat in self.features:
            out += [(f, prog_type(pt), at) for f, pt, at in FEATURES[feat][1]]
            out += [(f, prog_type(pt), at) for _a, _i, f, pt, at in TAIL_CALLS.get(feat, ())]
            out += [(f, prog_type("RAW_TRACEPOINT"), -1) for _tp, f in self._raw_tracepoints(feat)]
        out += [(f, prog_type("CGROUP_SKB"), at) for f, at in self._skb_extra()]
        return out

    def _skb_extra(self) -> list[tuple[str, int]]:
        """skb.c's programs this set needs that no feature's entry lists (sets without flow)."""
        if "flow" in self.features:
            return []
        return [(name, at) for name, at, feats in SKB_PROGRAMS if any(f in self.features for f in feats)]

    def _load_bcc(self) -> None:
        """BCC compiling in this process (AGENTTRACE_BCC_INPROCESS=1): the old path, kept to
        compare against and for a BCC whose module layout the cache does not know."""
        try:
            from bcc import BPF
        except ImportError as e:
            raise ProbeError(f"BCC is not importable ({e}); run scripts/setup.sh") from None
        src = self.source()
        try:
            self.bpf = BPF(text=src.encode(), cflags=self.cflags())
        except Exception as e:  # BCC raises bare Exception on compile/verifier failure
            raise ProbeError(f"compiling/loading probes ({', '.join(self.features)}) failed: {e}") from None
        self._load_programs(lambda ptype: getattr(BPF, ptype), Exception)
        release_compiler_memory()

    def _load_programs(self, prog_type, errors) -> None:
        for feat in self.features:
            for fname, ptype, atype in FEATURES[feat][1]:
                try:
                    fn = self.bpf.load_func(fname.encode(), prog_type(ptype), attach_type=atype)
                except errors as e:
                    raise ProbeError(f"loading program {fname} failed: {e}") from None
                self._cgroup_funcs.append((fn, atype))
            for array, idx, fname, ptype, atype in TAIL_CALLS.get(feat, ()):
                try:
                    fn = self.bpf.load_func(fname.encode(), prog_type(ptype), attach_type=atype)
                except errors as e:
                    raise ProbeError(f"loading program {fname} failed: {e}") from None
                t = self[array]
                t[C.c_int(idx)] = C.c_int(fn.fd)
            for tp, fname in self._raw_tracepoints(feat):
                # BCC keeps one program per raw tracepoint; libbpf attaches any number
                try:
                    fn = self.bpf.load_func(fname.encode(), prog_type("RAW_TRACEPOINT"))
                except errors as e:
                    raise ProbeError(f"loading program {fname} failed: {e}") from None
                fd = _lib().bpf_raw_tracepoint_open(tp.encode(), fn.fd)
                if fd < 0:
                    err = -fd if fd < -1 else C.get_errno()
                    raise ProbeError(f"attaching {fname} to raw tracepoint {tp} failed: {os.strerror(err)}")
                self._raw_tp_fds.append(fd)
                self._raw_tp_names.append(fname)
        for fname, atype in self._skb_extra():
            try:
                fn = self.bpf.load_func(fname.encode(), prog_type("CGROUP_SKB"), attach_type=atype)
            except errors as e:
                raise ProbeError(f"loading program {fname} failed: {e}") from None
            self._cgroup_funcs.append((fn, atype))

    def __getitem__(self, name: str):
        return self.bpf[name.encode()]

    def watch(self, abs_path: Path) -> int:
        """Scope the tracepoints to this cgroup subtree and attach the cgroup hooks to it."""
        cid = cgroup_id(abs_path)
        if cid in self._attached:
            return cid
        att = _Attachment(abs_path, cid)
        if self._cgroup_funcs:
            fd = os.open(abs_path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for fn, atype in self._cgroup_funcs:
                    att.link_fds.append(link_create(fn.fd, fd, atype))
            except ProbeError:
                for lfd in att.link_fds:
                    os.close(lfd)
                raise
            finally:
                os.close(fd)
        watched = self["watched"]
        lvl = level(abs_path)
        self._watch_from(lvl)
        watched[watched.Key(cid)] = watched.Leaf(lvl)
        self._attached[cid] = att
        if self.pin_dir is not None:
            self._pin(att)
        return cid

    # --- pinning (daemon, fail-closed) -------------------------------------------------
    # A pinned link keeps its cgroup program -- and through it the policy maps it reads --
    # attached after this process exits or crashes, so a forbidden connect attempted while
    # the daemon is down still fails. A restarted daemon attaches its own links first, then
    # removes the pins of its predecessors: at no moment is a cgroup without enforcement.
    def enable_pinning(self, pin_dir: Path) -> None:
        pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pin_dir = pin_dir
        if self.heartbeat is None:
            # pinned hooks outlive this process: armed, the connect hooks deny agents every
            # non-loopback destination and the exec hook kills every exec (in enforce mode)
            # once the reader stops beating (the map is in common.h: every probe set has it)
            from agenttrace.kernel.egress import Heartbeat
            self.heartbeat = Heartbeat(self, self.fail_closed_grace_s)
            self.heartbeat.arm()
        # raw tracepoint and perf links pin too (checked on 6.18): the escape and exec killers
        # outlive us as well
        raw = list(zip(self._raw_tp_fds, self._raw_tp_names))
        shared = getattr(self.bpf, "raw_tracepoint_fds", {})
        tps = getattr(self.bpf, "tracepoint_fds", {})
        for feat in self.features:
            raw += [(shared[tp.encode()], tp) for tp in PINNED_RAW_TRACEPOINTS.get(feat, ())
                    if tp.encode() in shared]
            # a tracepoint's fd is a BPF link where bpfsys made one (a perf event otherwise,
            # which cannot be pinned: then escape's exec check is a raw tracepoint of its own)
            raw += [(tps[tp.encode()], tp.replace(":", "_")) for tp in PINNED_TRACEPOINTS.get(feat, ())
                    if tp.encode() in tps and _is_link(tps[tp.encode()])]
        for fd, name in raw:
            path = pin_dir / f"rawtp-{name}-{os.getpid()}"
            if not path.exists():
                pin_object(fd, path)
                self._raw_pins.append(path)
        for att in self._attached.values():
            self._pin(att)

    def _pin(self, att: _Attachment) -> None:
        # one pin per program: several share an attach type (flow, tls, dns, icmp on egress),
        # and a name per attach type alone pinned only the first of them
        for i, (lfd, (_fn, atype)) in enumerate(zip(att.link_fds, self._cgroup_funcs)):
            path = self.pin_dir / f"link-{att.cgroup_id}-{atype}-{i}-{os.getpid()}"
            if not path.exists():
                pin_object(lfd, path)
                att.pinned.append(path)

    def remove_foreign_pins(self) -> list[str]:
        """Unpin links left by earlier agenttrace processes (after ours are attached)."""
        removed = []
        if self.pin_dir is None or not self.pin_dir.is_dir():
            return removed
        mine = {p for att in self._attached.values() for p in att.pinned} | set(self._raw_pins)
        for f in self.pin_dir.iterdir():
            if f.name.startswith(("link-", "rawtp-")) and f not in mine:
                try:
                    f.unlink()
                    removed.append(f.name)
                except OSError:
                    pass
        return removed

    def unpin(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.disarm()
            self.heartbeat = None
        self._unpin_raw()
        for att in self._attached.values():
            for p in att.pinned:
                try:
                    p.unlink()
                except OSError:
                    pass
            att.pinned.clear()

    def _unpin_raw(self) -> None:
        for p in self._raw_pins:
            try:
                p.unlink()
            except OSError:
                pass
        self._raw_pins.clear()

    def _watch_from(self, lvl: int) -> None:
        # the probes' cgroup walks start at this level (common.h watch_from): lowered before a
        # shallower cgroup is watched, so no moment exists where it is in the map but skipped;
        # never raised while anything is watched (a stale low value only costs a look-up)
        try:
            t = self["watch_from"]
        except KeyError:
            return
        cur = t[t.Key(0)].value
        if not self._attached or lvl < cur:
            t[t.Key(0)] = t.Leaf(lvl)

    def unwatch(self, cid: int) -> None:
        att = self._attached.pop(cid, None)
        if att is None:
            return
        watched = self["watched"]
        try:
            del watched[watched.Key(cid)]
        except KeyError:
            pass
        for p in att.pinned:
            try:
                p.unlink()
            except OSError:
                pass
        for lfd in att.link_fds:
            os.close(lfd)

    def watched_ids(self) -> list[int]:
        return list(self._attached)

    def drops(self) -> dict[tuple[int, int], int]:
        """Kernel-side drops (ring buffer full) per (agent cgroup id, event type)."""
        out: dict[tuple[int, int], int] = {}
        if self.bpf is None:
            return out
        for k, v in self["drops"].items():
            out[(k.agent_cgroup_id, k.type)] = sum(v)
        return out

    def set_flag(self, array: str, index: int, value: int) -> None:
        t = self[array]
        t[t.Key(index)] = t.Leaf(value)

    def close(self, keep_pins: bool = False) -> None:
        """Detach everything; with keep_pins, pinned links stay attached (fail-closed)."""
        if not keep_pins and self.heartbeat is not None and self.bpf is not None:
            self.heartbeat.disarm()
            self.heartbeat = None
        if keep_pins:
            self._raw_pins.clear()
            for att in self._attached.values():
                att.pinned.clear()     # forget them: unwatch must not unlink
        else:
            self._unpin_raw()
        for cid in list(self._attached):
            self.unwatch(cid)
        for fd in self._raw_tp_fds:
            os.close(fd)
        self._raw_tp_fds.clear()
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception:
                pass
            self.bpf = None
