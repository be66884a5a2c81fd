"""The bpf(2) calls the tracer needs after the probes are compiled: create maps, load and
attach programs, read and write map entries, and the map objects the rest of the package
uses (`Key`/`Leaf` ctypes classes, item access, per-CPU values).

Why not BCC's own objects: `import bcc` loads libbcc, which links libLLVM and libclang; their
relocations alone make ~64 MB resident before anything is compiled, and a compile takes the
process to ~200 MB. The long-lived tracer only needs the syscalls below, so it never maps the
compiler (tracer/kernel/probecache.py compiles in a child process).
"""
from __future__ import annotations

import ctypes as C
import json
import os
from pathlib import Path

_libc = C.CDLL(None, use_errno=True)
_libc.syscall.restype = C.c_long
_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine, 298)

# enum bpf_cmd
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, OBJ_GET_INFO_BY_FD = 5, 15
# enum bpf_map_type values whose values are per CPU, and the ring buffer
_PERCPU_TYPES = {5, 6, 10}          # percpu_hash, percpu_array, lru_percpu_hash
_ARRAY_TYPES = {2, 3, 6}            # array, prog_array, percpu_array
MAP_TYPE_RINGBUF = 27

# enum bpf_prog_type, by the names loader.FEATURES uses
PROG_TYPES = {"TRACEPOINT": 5, "CGROUP_SKB": 8, "CGROUP_SOCK": 9, "SOCK_OPS": 13,
              "CGROUP_DEVICE": 15, "RAW_TRACEPOINT": 17, "CGROUP_SOCK_ADDR": 18}


class BpfError(OSError):
    pass


def _bpf(cmd: int, attr) -> int:
    r = _libc.syscall(_NR_BPF, C.c_int(cmd), C.byref(attr), C.c_uint(C.sizeof(attr)))
    if r < 0:
        e = C.get_errno()
        raise BpfError(e, os.strerror(e))
    return r


class _MapCreate(C.Structure):
    _fields_ = [("map_type", C.c_uint32), ("key_size", C.c_uint32), ("value_size", C.c_uint32),
                ("max_entries", C.c_uint32), ("map_flags", C.c_uint32), ("inner_map_fd", C.c_uint32),
                ("numa_node", C.c_uint32), ("map_name", C.c_char * 16)]


class _MapElem(C.Structure):
    _fields_ = [("map_fd", C.c_uint32), ("pad", C.c_uint32), ("key", C.c_uint64),
                ("value", C.c_uint64), ("flags", C.c_uint64)]


class _ProgLoad(C.Structure):
    _fields_ = [("prog_type", C.c_uint32), ("insn_cnt", C.c_uint32), ("insns", C.c_uint64),
                ("license", C.c_uint64), ("log_level", C.c_uint32), ("log_size", C.c_uint32),
                ("log_buf", C.c_uint64), ("kern_version", C.c_uint32), ("prog_flags", C.c_uint32),
                ("prog_name", C.c_char * 16), ("prog_ifindex", C.c_uint32),
                ("expected_attach_type", C.c_uint32)]


class _InfoByFd(C.Structure):
    _fields_ = [("bpf_fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]


class MapInfo(C.Structure):
    """The head of struct bpf_map_info (the kernel fills only as much as we ask for)."""
    _fields_ = [("type", C.c_uint32), ("id", C.c_uint32), ("key_size", C.c_uint32),
                ("value_size", C.c_uint32), ("max_entries", C.c_uint32), ("map_flags", C.c_uint32),
                ("name", C.c_char * 16)]


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    attr = _InfoByFd(fd, C.sizeof(info), C.addressof(info))
    _bpf(OBJ_GET_INFO_BY_FD, attr)
    return info


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int,
               name: str) -> int:
    attr = _MapCreate(map_type, key_size, value_size, max_entries, flags, 0, 0,
                      _obj_name(name))
    return _bpf(MAP_CREATE, attr)


def _obj_name(name: str) -> bytes:
    # BPF_OBJ_NAME_LEN is 16 with the NUL; the kernel takes [A-Za-z0-9_.] only
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)[:15].encode()


def prog_load(prog_type: int, insns: bytes, license: bytes, name: str, attach_type: int = 0) -> int:
    buf = C.create_string_buffer(insns, len(insns))
    lic = C.create_string_buffer(license)
    attr = _ProgLoad(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=C.addressof(buf),
                     license=C.addressof(lic), prog_name=_obj_name(name),
                     expected_attach_type=max(attach_type, 0))
    try:
        return _bpf(PROG_LOAD, attr)
    except BpfError as first:
        # load again with the verifier's log: the error then says which instruction failed
        size = 1 << 24
        log = C.create_string_buffer(size)
        attr.log_level, attr.log_size, attr.log_buf = 1, size, C.addressof(log)
        try:
            return _bpf(PROG_LOAD, attr)
        except BpfError:
            text = log.value.decode(errors="replace").strip().splitlines()
            raise BpfError(first.errno, f"{first.strerror}; verifier: " + "\n".join(text[-20:])) from None


class _RawTp(C.Structure):
    _fields_ = [("name", C.c_uint64), ("prog_fd", C.c_uint32), ("pad", C.c_uint32)]


_RAW_TRACEPOINT_OPEN = 17


def attach_raw_tracepoint(prog_fd: int, event: str) -> int:
    name = C.create_string_buffer(event.encode())
    return _bpf(_RAW_TRACEPOINT_OPEN, _RawTp(C.addressof(name), prog_fd, 0))


# --- tracepoints --------------------------------------------------------------------------
class _PerfAttr(C.Structure):
    _fields_ = [("type", C.c_uint32), ("size", C.c_uint32), ("config", C.c_uint64),
                ("sample_period", C.c_uint64), ("sample_type", C.c_uint64),
                ("read_format", C.c_uint64), ("flags", C.c_uint64), ("wakeup_events", C.c_uint32),
                ("bp_type", C.c_uint32), ("config1", C.c_uint64), ("config2", C.c_uint64),
                ("branch_sample_type", C.c_uint64), ("sample_regs_user", C.c_uint64),
                ("sample_stack_user", C.c_uint32), ("clockid", C.c_int32),
                ("sample_regs_intr", C.c_uint64), ("aux_watermark", C.c_uint32),
                ("sample_max_stack", C.c_uint16), ("reserved", C.c_uint16)]


_PERF_TYPE_TRACEPOINT = 2
_PERF_FLAG_FD_CLOEXEC = 8
_PERF_EVENT_IOC_ENABLE = 0x2400
_PERF_EVENT_IOC_SET_BPF = 0x40042408


_LINK_CREATE = 28
_BPF_PERF_EVENT = 41        # enum bpf_attach_type


class _LinkCreate(C.Structure):
    _fields_ = [("prog_fd", C.c_uint32), ("target_fd", C.c_uint32), ("attach_type", C.c_uint32),
                ("flags", C.c_uint32), ("bpf_cookie", C.c_uint64), ("pad", C.c_uint64 * 4)]


def attach_tracepoint(prog_fd: int, tracefs: Path, category: str, event: str) -> int:
    """A perf event on the tracepoint with the program set on it; the program runs on every
    CPU for as long as the returned fd is open. From kernel 5.15 that fd is a BPF link holding
    the perf event, which can be pinned (escape's exec check outlives a killed daemon, loader
    enable_pinning); before, the perf event itself."""
    tp_id = int((tracefs / "events" / category / event / "id").read_text())
    attr = _PerfAttr(type=_PERF_TYPE_TRACEPOINT, size=C.sizeof(_PerfAttr), config=tp_id,
                     sample_period=1, wakeup_events=1)
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, C.byref(attr), -1, 0, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        e = C.get_errno()
        raise BpfError(e, f"perf_event_open {category}:{event}: {os.strerror(e)}")
    _libc.ioctl.argtypes = [C.c_int, C.c_ulong, C.c_ulong]
    try:
        link = _bpf(_LINK_CREATE, _LinkCreate(prog_fd, fd, _BPF_PERF_EVENT, 0))
    except BpfError:
        link = -1           # no perf links here: the perf event holds the program
    if link >= 0:
        ok = _libc.ioctl(fd, _PERF_EVENT_IOC_ENABLE, 0) >= 0
        e = C.get_errno()
        os.close(fd)        # the link holds the event now
        if not ok:
            os.close(link)
            raise BpfError(e, f"enabling {category}:{event}: {os.strerror(e)}")
        return link
    if _libc.ioctl(fd, _PERF_EVENT_IOC_SET_BPF, prog_fd) < 0 or _libc.ioctl(fd, _PERF_EVENT_IOC_ENABLE, 0) < 0:
        e = C.get_errno()
        os.close(fd)
        raise BpfError(e, f"attaching to {category}:{event}: {os.strerror(e)}")
    return fd


# --- map types from BCC's descriptions ------------------------------------------------------
_SCALARS = {
    "char": C.c_char, "signed char": C.c_byte, "unsigned char": C.c_ubyte, "_Bool": C.c_bool,
    "short": C.c_short, "unsigned short": C.c_ushort, "int": C.c_int, "unsigned int": C.c_uint,
    "long": C.c_long, "unsigned long": C.c_ulong, "long long": C.c_longlong,
    "unsigned long long": C.c_ulonglong, "__int128": C.c_ubyte * 16,
    "unsigned __int128": C.c_ubyte * 16, "void *": C.c_void_p,
}


def ctype_of(desc):
    """ctypes type of one of BCC's JSON type descriptions: a C type name, or
    [name, [[field, type(, [dims] | bits)]...], "struct"|"struct_packed"|"union"]."""
    if isinstance(desc, str):
        if desc.endswith("*"):
            return C.c_void_p
        if desc not in _SCALARS:
            raise ValueError(f"map type {desc!r} has no ctypes equivalent")
        return _SCALARS[desc]
    name, members, kind = desc[0], desc[1], desc[2] if len(desc) > 2 else "struct"
    fields = []
    for m in members:
        t = ctype_of(m[1])
        if len(m) > 2 and isinstance(m[2], list):
            for dim in reversed(m[2]):
                t = t * dim
            fields.append((m[0], t))
        elif len(m) > 2:
            fields.append((m[0], t, m[2]))       # bit field
        else:
            fields.append((m[0], t))
    base = C.Union if kind == "union" else C.Structure
    ns = {"_fields_": fields}
    if kind == "struct_packed":
        ns["_pack_"] = 1
    return type(name or "anon", (base,), ns)


def possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class Map:
    """One map: `t[key]`, `t[key] = leaf`, `del t[key]`, `items()`, `Key`, `Leaf`, `map_fd`.
    Per-CPU maps read as a list with one value per possible CPU (ints for scalar leaves)."""

    def __init__(self, name: str, fd: int, map_type: int, key_desc, leaf_desc, max_entries: int):
        self.name = name
        self.map_fd = fd
        self.map_type = map_type
        self.max_entries = max_entries
        self.Key = ctype_of(key_desc)
        self.Leaf = ctype_of(leaf_desc)
        self.percpu = map_type in _PERCPU_TYPES
        self.is_array = map_type in _ARRAY_TYPES
        if self.percpu:
            self._ncpu = possible_cpus()
            self._stride = (C.sizeof(self.Leaf) + 7) & ~7
        self._cb = None

    def _key(self, key):
        if isinstance(key, int):
            key = self.Key(key)
        return key

    def _value_buf(self):
        if self.percpu:
            return C.create_string_buffer(self._stride * self._ncpu)
        return self.Leaf()

    def _unpack(self, buf):
        if not self.percpu:
            return buf
        scalar = not issubclass(self.Leaf, (C.Structure, C.Union, C.Array))
        out = []
        for i in range(self._ncpu):
            v = self.Leaf.from_buffer_copy(buf, i * self._stride)
            out.append(v.value if scalar else v)
        return out

    def _lookup(self, key):
        key = self._key(key)
        val = self._value_buf()
        try:
            _bpf(MAP_LOOKUP_ELEM, _MapElem(self.map_fd, 0, C.addressof(key), C.addressof(val), 0))
        except BpfError:
            return None
        return self._unpack(val)

    def __getitem__(self, key):
        v = self._lookup(key)
        if v is None:
            raise KeyError(key)
        return v

    def get(self, key, default=None):
        v = self._lookup(key)
        return default if v is None else v

    def __setitem__(self, key, leaf):
        key = self._key(key)
        if self.percpu and not isinstance(leaf, (C.Array, bytes)):
            buf = C.create_string_buffer(self._stride * self._ncpu)
            vals = leaf if isinstance(leaf, (list, tuple)) else [leaf] * self._ncpu
            for i, v in enumerate(vals):
                v = v if isinstance(v, (C.Structure, C.Union, C._SimpleCData)) else self.Leaf(v)
                C.memmove(C.addressof(buf) + i * self._stride, C.addressof(v), C.sizeof(v))
            leaf = buf
        _bpf(MAP_UPDATE_ELEM, _MapElem(self.map_fd, 0, C.addressof(key), C.addressof(leaf), 0))

    def __delitem__(self, key):
        key = self._key(key)
        if self.is_array:
            # array slots cannot be deleted; they read as zero once cleared
            self[key] = self.Leaf() if not self.percpu else [self.Leaf()] * self._ncpu
            return
        try:
            _bpf(MAP_DELETE_ELEM, _MapElem(self.map_fd, 0, C.addressof(key), 0, 0))
        except BpfError as e:
            raise KeyError(key) from e

    def keys(self):
        out = []
        prev = None
        while True:
            nxt = self.Key()
            attr = _MapElem(self.map_fd, 0, C.addressof(prev) if prev is not None else 0,
                            C.addressof(nxt), 0)
            try:
                _bpf(MAP_GET_NEXT_KEY, attr)
            except BpfError:
                return out
            out.append(nxt)
            prev = nxt

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        out = []
        for k in self.keys():
            v = self._lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    def values(self):
        return [v for _k, v in self.items()]

    def __len__(self):
        return len(self.keys())

    def clear(self):
        for k in self.keys():
            try:
                del self[k]
            except KeyError:
                pass

    # BCC-compatible ring buffer reading for the few callers that use a callback (tests,
    # architectures without the mmap reader): cb(ctx, data_address, size)
    def open_ring_buffer(self, callback, ctx=None):
        from agenttrace.kernel import ringbuf
        holder = self

        def on_view(view, size):
            buf = (C.c_char * size).from_buffer_copy(view)
            callback(ctx, C.addressof(buf), size)

        holder._cb = ringbuf.RingReader(self.map_fd, self.max_entries, on_view)
        return holder._cb


def load_desc(text: str):
    return json.loads(text)
