"""Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

The probes read a handful of kernel-internal fields (a task's parent, argv bounds, exit
code). Those offsets must come from the running kernel, never from headers that may belong
to another kernel (docs/ARCHITECTURE.md §4), so the loader asks this module and passes them as -D constants.
Only the parts of the BTF format needed to find struct members are decoded.
"""
from __future__ import annotations

import array
import struct
from functools import lru_cache
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")

_KIND_STRUCT, _KIND_UNION = 4, 5
# bytes that follow the 12-byte common header, per kind (vlen = number of entries)
_FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


class BTFError(Exception):
    pass


class BTF:
    """Types are indexed on one pass over their headers; members are decoded only for the
    structs asked about. Decoding every member of every type (~127k types here) took 0.5 s of
    each tracer start, more than loading most probes (docs/STARTUP.md)."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != 0xEB9F:
            raise BTFError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        # per type id (0 is void): where its header starts, 0 for types of no interest here.
        # An array, not objects: 127k types as tuples were ~25 MB of the tracer's peak RSS.
        self._pos = array.array("I", [0])
        self._by_name_off: dict[int, list[int]] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack, by_name, positions = struct.Struct("<II").unpack_from, self._by_name_off, self._pos
        fixed, per = _FIXED_EXTRA, _PER_VLEN
        aggregate = (_KIND_STRUCT, _KIND_UNION)
        while pos < end:
            name_off, info = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if kind in aggregate:
                if name_off:
                    by_name.setdefault(name_off, []).append(len(positions))
                positions.append(pos)
            else:
                positions.append(0)
            pos += 12 + fixed.get(kind, 0) + per.get(kind, 0) * vlen

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _name_off(self, name: str) -> int | None:
        b = name.encode()
        if self._strings.startswith(b + b"\0"):
            return 0
        i = self._strings.find(b"\0" + b + b"\0")
        return None if i < 0 else i + 1

    def _members(self, tid: int):
        pos = self._pos[tid]
        _name, info, _size = struct.unpack_from("<III", self._data, pos)
        kflag = info >> 31
        for i in range(info & 0xFFFF):
            m_name, m_type, m_off = struct.unpack_from("<III", self._data, pos + 12 + 12 * i)
            yield m_name, m_type, (m_off & 0xFFFFFF if kflag else m_off)

    def _find(self, tid: int, field: str) -> int | None:
        """Bit offset of `field` in struct/union `tid`, looking into anonymous members."""
        for m_name, m_type, bit_off in self._members(tid):
            if m_name and self._str(m_name) == field:
                return bit_off
            if not m_name:
                inner = self._resolve_aggregate(m_type)
                if inner is not None:
                    sub = self._find(inner, field)
                    if sub is not None:
                        return bit_off + sub
        return None

    def _resolve_aggregate(self, tid: int) -> int | None:
        return tid if tid < len(self._pos) and self._pos[tid] else None

    def member_offset(self, struct_name: str, field: str) -> int:
        """Byte offset of struct_name.field (fields of anonymous sub-structs included)."""
        off = self._name_off(struct_name)
        for tid in self._by_name_off.get(off, []) if off is not None else []:
            if struct.unpack_from("<I", self._data, self._pos[tid] + 4)[0] & 0xFFFF:
                bit = self._find(tid, field)
                if bit is not None:
                    if bit % 8:
                        raise BTFError(f"{struct_name}.{field} is a bitfield")
                    return bit // 8
        raise BTFError(f"{struct_name}.{field} not found in kernel BTF")


@lru_cache(maxsize=1)
def kernel_btf() -> BTF:
    try:
        return BTF(VMLINUX.read_bytes())
    except FileNotFoundError:
        raise BTFError(f"{VMLINUX} not found: the kernel was built without CONFIG_DEBUG_INFO_BTF") from None


# The only kernel-internal fields any probe reads, and why.
PROBE_FIELDS = {
    "AT_OFF_TASK_PID": ("task_struct", "pid"),            # tell a new thread from a new process at fork
    "AT_OFF_TASK_TGID": ("task_struct", "tgid"),
    "AT_OFF_TASK_REAL_PARENT": ("task_struct", "real_parent"),  # ppid at exec
    "AT_OFF_TASK_MM": ("task_struct", "mm"),              # argv lives in the new mm
    "AT_OFF_TASK_EXIT_CODE": ("task_struct", "exit_code"),
    "AT_OFF_TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    "AT_OFF_TASK_START_TIME": ("task_struct", "start_time"),  # monotonic ns, for duration
    "AT_OFF_MM_ARG_START": ("mm_struct", "arg_start"),
    "AT_OFF_MM_ARG_END": ("mm_struct", "arg_end"),
}


# Where a child starts: a clone3(CLONE_INTO_CGROUP) child is born in the cgroup its parent
# names, with no cgroup_attach_task to see, and no helper or tracepoint argument gives the
# cgroup of a task other than current. escape.c reads child->cgroups->dfl_cgrp->kn->id at
# sched_process_fork (what bpf_get_current_cgroup_id() computes for current). Optional: a
# kernel whose BTF lacks one of them keeps the catch at the child's first exec.
OPTIONAL_FIELDS = {
    "AT_OFF_TASK_CGROUPS": ("task_struct", "cgroups"),
    "AT_OFF_CSS_SET_DFL_CGRP": ("css_set", "dfl_cgrp"),
    "AT_OFF_CGROUP_KN": ("cgroup", "kn"),
    "AT_OFF_KERNFS_NODE_ID": ("kernfs_node", "id"),
}


def probe_offsets(btf: BTF | None = None) -> dict[str, int]:
    btf = btf or kernel_btf()
    out = {k: btf.member_offset(s, f) for k, (s, f) in PROBE_FIELDS.items()}
    try:
        out.update({k: btf.member_offset(s, f) for k, (s, f) in OPTIONAL_FIELDS.items()})
    except BTFError:
        pass         # all or none: the probe tests one macro
    return out
