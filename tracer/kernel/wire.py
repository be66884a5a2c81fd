"""ctypes mirrors of probes/agenttrace.h and the decode stage.

tests/test_wire.py compiles the C header with the host compiler and checks every size and
offset below, so a field added on one side and not the other fails the suite.
"""
from __future__ import annotations

import ctypes as C
import ipaddress
import socket
import struct

# True in the compiled build only (scripts/build_native.py; wire.pxd); the deb's venv has no Cython
_COMPILED = False
try:
    import cython
    _COMPILED = cython.compiled
except ImportError:
    pass

COMM_LEN = 16
PATH_MAX = 256
ARGS_MAX = 4096
DNS_MAX = 512
FLOW_BYTES = 256

# at_config indices (one runtime-config map for every probe family); never renumber
CFG_ENFORCE, CFG_GPU_FENCE, CFG_GPU_DEFAULT, CFG_DEFAULT_GROUP, CFG__MAX = 0, 1, 2, 3, 5
CFG_FORK_RECORDS = 4
AT_CFG_ENFORCE, AT_CFG_GPU_FENCE, AT_CFG_GPU_DEFAULT = CFG_ENFORCE, CFG_GPU_FENCE, CFG_GPU_DEFAULT
AT_CFG_DEFAULT_GROUP = CFG_DEFAULT_GROUP

# enum at_event_type: never renumber
EV_EXEC, EV_FORK, EV_EXIT, EV_CONNECT, EV_CONN_RESULT = 1, 2, 3, 4, 5
EV_LISTEN, EV_DNS, EV_FLOW, EV_DEVICE, EV_FILE = 6, 7, 8, 9, 10
EV_SOCKET, EV_ESCAPE = 11, 12
EV_SNI = 15              # 13 and 14 are reserved for other record types
EV_MAX = 16

TYPE_NAMES = {EV_EXEC: "exec", EV_FORK: "fork", EV_EXIT: "exit", EV_CONNECT: "connect",
              EV_CONN_RESULT: "conn_result", EV_LISTEN: "listen", EV_DNS: "dns", EV_FLOW: "flow",
              EV_DEVICE: "device", EV_FILE: "file", EV_SOCKET: "socket", EV_ESCAPE: "escape",
              EV_SNI: "sni"}

EXEC_ARGS_TRUNCATED, EXEC_ARGS_READ_FAILED, EXEC_KILLED = 0x1, 0x2, 0x4
OP_CONNECT, OP_SENDMSG, OP_ICMP = 0, 1, 2
VERDICT_ALLOWED, VERDICT_BLOCKED = 0, 1
RESULT_ESTABLISHED, RESULT_REFUSED, RESULT_ERROR = 1, 2, 3
LISTEN_LISTEN, LISTEN_ACCEPT = 1, 2
DIR_EGRESS, DIR_INGRESS = 0, 1
PROTO_UNKNOWN, PROTO_SSH, PROTO_STRATUM, PROTO_TLS, PROTO_HTTP = 0, 1, 2, 3, 4
FILE_READ, FILE_WRITE = 1, 2
SYS_NAMES = {1: "openat", 2: "openat2", 3: "open", 4: "creat", 5: "renameat2", 6: "renameat",
             7: "rename", 8: "linkat", 9: "link"}
FCLASS_UNKNOWN, FCLASS_AUTHORIZED_KEYS, FCLASS_PRIVATE_KEY, FCLASS_HOST_KEY, FCLASS_SSH_OTHER = 0, 1, 2, 3, 4
FCLASS_NAMES = {0: "unknown", 1: "authorized_keys", 2: "private_key", 3: "host_key", 4: "ssh_other"}
FILE_KILLED, FILE_READ_FAILED, FILE_PATH_TRUNCATED, FILE_LATE_READ = 0x1, 0x2, 0x4, 0x8
AT_FDCWD = -100
SOCK_DENY, SOCK_REPORT = 1, 2
SOCK_F_SYSCALL, SOCK_F_KILLED = 0x1, 0x2
ESC_SELF, ESC_KILLED, ESC_WRITER_IN, ESC_AT_EXEC, ESC_AT_FORK = 0x1, 0x2, 0x4, 0x8, 0x10


class Header(C.Structure):
    _fields_ = [("type", C.c_uint16), ("size", C.c_uint16), ("pid", C.c_uint32),
                ("tgid", C.c_uint32), ("uid", C.c_uint32), ("ktime", C.c_uint64),
                ("cgroup_id", C.c_uint64), ("agent_cgroup_id", C.c_uint64),
                ("comm", C.c_char * COMM_LEN)]


class Exec(C.Structure):
    _fields_ = [("h", Header), ("ppid", C.c_uint32), ("old_pid", C.c_uint32),
                ("flags", C.c_uint32), ("args_len", C.c_uint32), ("policy_id", C.c_uint32),
                ("creator", C.c_uint32), ("filename", C.c_char * PATH_MAX),
                ("args", C.c_char * ARGS_MAX)]


class Fork(C.Structure):
    _fields_ = [("h", Header), ("child_tgid", C.c_uint32), ("parent_tgid", C.c_uint32)]


class Exit(C.Structure):
    _fields_ = [("h", Header), ("exit_code", C.c_int32), ("pad", C.c_uint32),
                ("start_ktime", C.c_uint64)]


class Connect(C.Structure):
    _fields_ = [("h", Header), ("cookie", C.c_uint64), ("sk", C.c_uint64),
                ("family", C.c_uint16), ("protocol", C.c_uint16), ("dport", C.c_uint16),
                ("op", C.c_uint8), ("verdict", C.c_uint8), ("daddr", C.c_uint8 * 16),
                ("policy_id", C.c_uint32), ("pad", C.c_uint32)]


class ConnResult(C.Structure):
    _fields_ = [("h", Header), ("sk", C.c_uint64), ("family", C.c_uint16),
                ("sport", C.c_uint16), ("dport", C.c_uint16), ("result", C.c_uint16),
                ("error", C.c_int32), ("pad", C.c_uint32), ("saddr", C.c_uint8 * 16),
                ("daddr", C.c_uint8 * 16)]


class Listen(C.Structure):
    _fields_ = [("h", Header), ("cookie", C.c_uint64), ("family", C.c_uint16),
                ("protocol", C.c_uint16), ("lport", C.c_uint16), ("rport", C.c_uint16),
                ("what", C.c_uint8), ("pad", C.c_uint8 * 7), ("laddr", C.c_uint8 * 16),
                ("raddr", C.c_uint8 * 16)]


class Dns(C.Structure):
    _fields_ = [("h", Header), ("cookie", C.c_uint64), ("family", C.c_uint16),
                ("protocol", C.c_uint16), ("sport", C.c_uint16), ("dport", C.c_uint16),
                ("direction", C.c_uint8), ("pad", C.c_uint8), ("len", C.c_uint16),
                ("pad2", C.c_uint32), ("saddr", C.c_uint8 * 16), ("daddr", C.c_uint8 * 16),
                ("msg", C.c_uint8 * DNS_MAX)]


class Flow(C.Structure):
    _fields_ = [("h", Header), ("cookie", C.c_uint64), ("family", C.c_uint16),
                ("sport", C.c_uint16), ("dport", C.c_uint16), ("direction", C.c_uint8),
                ("verdict", C.c_uint8), ("len", C.c_uint32), ("proto_hint", C.c_uint32),
                ("saddr", C.c_uint8 * 16), ("daddr", C.c_uint8 * 16),
                ("data", C.c_uint8 * FLOW_BYTES), ("skipped", C.c_uint32), ("segs", C.c_uint16),
                ("fflags", C.c_uint16)]


FLOWF_REASSEMBLED, FLOWF_PADDED, FLOWF_PAD_LIMIT, FLOWF_FLUSHED = 0x1, 0x2, 0x4, 0x8
FLOWF_GAP, FLOWF_LOST, FLOWF_PREBANNER = 0x10, 0x20, 0x40
FLOWF_NAMES = {FLOWF_REASSEMBLED: "reassembled", FLOWF_PADDED: "padded", FLOWF_PAD_LIMIT: "pad_limit",
               FLOWF_FLUSHED: "flushed", FLOWF_GAP: "gap", FLOWF_LOST: "lost", FLOWF_PREBANNER: "prebanner"}


SNI_MAX, SNI_NAME_MAX = 256, 253
SNI_MATCH_EXACT, SNI_MATCH_SUBDOMAINS = 1, 2


class Sni(C.Structure):
    _fields_ = [("h", Header), ("cookie", C.c_uint64), ("family", C.c_uint16),
                ("sport", C.c_uint16), ("dport", C.c_uint16), ("verdict", C.c_uint8),
                ("match", C.c_uint8), ("policy_id", C.c_uint32), ("name_len", C.c_uint16),
                ("name_off", C.c_uint16), ("saddr", C.c_uint8 * 16), ("daddr", C.c_uint8 * 16),
                ("name", C.c_uint8 * SNI_MAX)]


class Device(C.Structure):
    _fields_ = [("h", Header), ("major", C.c_uint32), ("minor", C.c_uint32),
                ("access", C.c_uint32), ("dev_type", C.c_uint16), ("verdict", C.c_uint8),
                ("pad", C.c_uint8)]


class File(C.Structure):
    _fields_ = [("h", Header), ("op", C.c_uint32), ("flags", C.c_uint32),
                ("path", C.c_char * PATH_MAX), ("dfd", C.c_int32), ("policy_id", C.c_uint32),
                ("syscall", C.c_uint16), ("path_len", C.c_uint16), ("fclass", C.c_uint16),
                ("fflags", C.c_uint16)]


class Socket(C.Structure):
    _fields_ = [("h", Header), ("family", C.c_uint16), ("type", C.c_uint16),
                ("protocol", C.c_uint16), ("verdict", C.c_uint8), ("action", C.c_uint8),
                ("policy_id", C.c_uint32), ("flags", C.c_uint16), ("error", C.c_uint16)]


class Escape(C.Structure):
    _fields_ = [("h", Header), ("dst_cgroup_id", C.c_uint64), ("moved_tgid", C.c_uint32),
                ("writer_tgid", C.c_uint32), ("dst_level", C.c_int32), ("flags", C.c_uint32),
                ("dst_path", C.c_char * PATH_MAX)]


FORKF_SEEN, FORKF_EXECED, FORKF_EXITED = 0x1, 0x2, 0x4


class ForkEntry(C.Structure):
    _fields_ = [("creator", C.c_uint32), ("flags", C.c_uint32), ("ktime", C.c_uint64)]


class ProcCount(C.Structure):
    _fields_ = [("forks", C.c_uint64), ("forks_quiet", C.c_uint64), ("exits_quiet", C.c_uint64),
                ("released", C.c_uint64)]


class DropKey(C.Structure):
    _fields_ = [("agent_cgroup_id", C.c_uint64), ("type", C.c_uint32), ("pad", C.c_uint32)]


STRUCTS = {"at_header": Header, "at_exec": Exec, "at_fork": Fork, "at_exit": Exit,
           "at_connect": Connect, "at_conn_result": ConnResult, "at_listen": Listen,
           "at_dns": Dns, "at_flow": Flow, "at_device": Device, "at_file": File,
           "at_socket": Socket, "at_escape": Escape, "at_drop_key": DropKey,
           "at_sni": Sni, "at_fork_entry": ForkEntry, "at_proc_count": ProcCount}

BY_TYPE = {EV_EXEC: Exec, EV_FORK: Fork, EV_EXIT: Exit, EV_CONNECT: Connect,
           EV_CONN_RESULT: ConnResult, EV_LISTEN: Listen, EV_DNS: Dns, EV_FLOW: Flow,
           EV_DEVICE: Device, EV_FILE: File, EV_SOCKET: Socket, EV_ESCAPE: Escape,
           EV_SNI: Sni}

_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def addr_str(raw, family: int) -> str:
    b = bytes(raw)
    if family == _AF_INET:
        # a storm repeats a handful of addresses: one dict lookup instead of a slice and a
        # conversion per address
        s = _V4_STR.get(b)
        if s is None:
            if len(_V4_STR) >= 4096:
                _V4_STR.clear()
            s = _V4_STR[b] = socket.inet_ntop(socket.AF_INET, b[12:16])
        return s
    if b[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, b[12:16])
    s = _V6_STR.get(b)
    if s is None:
        # ipaddress gives the RFC 5952 form the rest of the pipeline compares against;
        # it is slow, and storms repeat a handful of addresses
        if len(_V6_STR) >= 4096:
            _V6_STR.clear()
        s = _V6_STR[b] = str(ipaddress.IPv6Address(b))
    return s


_V6_STR: dict[bytes, str] = {}
_V4_STR: dict[bytes, str] = {}    # AF_INET records: the address in the last 4 of 16 bytes
_AF_INET = int(socket.AF_INET)


def split_args(raw: bytes) -> list[str]:
    """argv as the kernel lays it out: NUL-separated, the last one NUL-terminated."""
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    if not raw:
        return []
    # one decode, then the split: NUL is a whole character in UTF-8 and ends any sequence
    # before it, so each argument's undecodable bytes are escaped exactly as decoding it alone
    return raw.decode("utf-8", "backslashreplace").split("\0")


def cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def decode_buf(buf, size: int):
    """Decode one ring-buffer record held in a buffer (bytes, or a memoryview of the ring from
    tracer/kernel/ringbuf.py) into (type, body ctypes object); the body is a copy, so the ring's space
    can be reused at once. (type, None) for a type this build does not know."""
    rtype = buf[0] | buf[1] << 8
    known = _SIZED.get(rtype)
    if known is None:
        return rtype, None
    cls, full = known
    if size >= full:
        # from_buffer_copy takes the struct's first bytes of a longer buffer: no slice copy
        return rtype, cls.from_buffer_copy(buf)
    # variable-length tail (exec argv): pad the copy to the full struct (ljust: one copy
    # fewer than concatenating a zero block)
    return rtype, cls.from_buffer_copy(bytes(buf).ljust(full, b"\0"))


_SIZED = {t: (cls, C.sizeof(cls)) for t, cls in BY_TYPE.items()}


def decode(ptr: int, size: int):
    """`decode_buf` for a record at an address (BCC's per-record callback)."""
    return decode_buf(C.string_at(ptr, size), size)


# --- straight from the ring: struct.Struct views of the hot record types -----------------------
# ctypes' from_buffer_copy makes an object per record (a padded copy of the whole 4.4 KiB exec
# struct for a short argv) and each field read goes through a descriptor; one precompiled
# Struct.unpack_from on the ring's memoryview hands a handler exactly the fields it reads, as
# one tuple. The formats are derived from the ctypes mirrors (offsets and types), which stay
# the parity-tested contract, so the two cannot drift (tests/test_wire_struct.py).
_CODES = {C.c_uint8: "B", C.c_uint16: "H", C.c_uint32: "I", C.c_int32: "i", C.c_uint64: "Q",
          C.c_int64: "q", C.c_int16: "h", C.c_int8: "b"}


def leaves(cls, prefix: str = "", base: int = 0):
    """(dotted name, offset, ctype) of every field, nested structures flattened ("h.tgid")."""
    out = []
    for name, typ, *_ in cls._fields_:
        off = base + getattr(cls, name).offset
        if isinstance(typ, type) and issubclass(typ, C.Structure):
            out += leaves(typ, f"{prefix}{name}.", off)
        else:
            out.append((prefix + name, off, typ))
    return out


def struct_of(cls, names) -> struct.Struct:
    """A little-endian Struct reading `names` (dotted leaves of `cls`, in offset order) and
    skipping every other byte; char and byte arrays read as bytes of their full length."""
    by = {n: (off, typ) for n, off, typ in leaves(cls)}
    fmt, pos = ["<"], 0
    for n in names:
        off, typ = by[n]
        if off < pos:
            raise ValueError(f"{cls.__name__}.{n}: fields out of offset order")
        if off > pos:
            fmt.append(f"{off - pos}x")
        code = _CODES.get(typ)
        if code is None:
            if not issubclass(typ, C.Array) or typ._type_ not in (C.c_char, C.c_uint8):
                raise TypeError(f"{cls.__name__}.{n}: no struct code for {typ}")
            code = f"{typ._length_}s"
        fmt.append(code)
        pos = off + C.sizeof(typ)
    return struct.Struct("".join(fmt))


def unpack(s: struct.Struct, view):
    """`s.unpack_from(view)`, with a record shorter than the fields read taken as zero-padded
    (as `decode_buf` pads it)."""
    if len(view) < s.size:
        return s.unpack_from(bytes(view).ljust(s.size, b"\0"))
    return s.unpack_from(view)


_HDR = ("h.tgid", "h.uid", "h.ktime", "h.agent_cgroup_id", "h.comm")
EXEC_FIELDS = ("h.tgid", "h.uid", "h.ktime", "h.cgroup_id", "h.agent_cgroup_id", "h.comm", "ppid",
               "flags", "args_len", "policy_id", "creator", "filename")
EXIT_FIELDS = _HDR + ("exit_code", "start_ktime")
CONNECT_FIELDS = _HDR + ("cookie", "sk", "family", "protocol", "dport", "op", "verdict", "daddr",
                         "policy_id")
CONN_RESULT_FIELDS = ("sk", "family", "sport", "result", "error", "saddr")
LISTEN_FIELDS = _HDR + ("cookie", "family", "protocol", "lport", "rport", "what", "laddr", "raddr")
EXEC_S = struct_of(Exec, EXEC_FIELDS)
EXIT_S = struct_of(Exit, EXIT_FIELDS)
CONNECT_S = struct_of(Connect, CONNECT_FIELDS)
CONN_RESULT_S = struct_of(ConnResult, CONN_RESULT_FIELDS)
LISTEN_S = struct_of(Listen, LISTEN_FIELDS)
# the types decoded this way, with the fields each Struct reads (the parity test walks these)
FAST = {EV_EXEC: (Exec, EXEC_FIELDS, EXEC_S), EV_EXIT: (Exit, EXIT_FIELDS, EXIT_S),
        EV_CONNECT: (Connect, CONNECT_FIELDS, CONNECT_S),
        EV_CONN_RESULT: (ConnResult, CONN_RESULT_FIELDS, CONN_RESULT_S),
        EV_LISTEN: (Listen, LISTEN_FIELDS, LISTEN_S)}
ARGS_OFF = Exec.args.offset


def exec_args(view, n: int) -> bytes:
    """The argv bytes an exec record's args_len names, as `bytes(obj)[ARGS_OFF:ARGS_OFF+n]` of
    the zero-padded ctypes copy gives them (at most ARGS_MAX, zeros past the record's end)."""
    m = n if n <= ARGS_MAX else ARGS_MAX
    if _COMPILED:
        if m <= 0:
            return b""
        return _args_c(view, m)
    raw = bytes(view[ARGS_OFF:ARGS_OFF + m])
    return raw if len(raw) == m else raw.ljust(m, b"\0")


def _args_c(view, m):
    """exec_args for the compiled build only: one copy straight from the record's buffer
    instead of a slice view and its copy."""
    PyObject_GetBuffer(view, cython.address(buf), PyBUF_SIMPLE)
    try:
        p = cython.cast(cython.p_char, buf.buf)
        aoff = ARGS_OFF
        avail = buf.len - aoff
        if avail >= m:
            return PyBytes_FromStringAndSize(p + aoff, m)
        head = p[aoff:aoff + avail] if avail > 0 else b""
        return head.ljust(m, b"\0")
    finally:
        PyBuffer_Release(cython.address(buf))
