"""The one rule every map writer follows: write the new entries first, then delete what is no
longer wanted, so a rewrite (start, reload) never opens a window in which a forbidden entry is
missing."""
from __future__ import annotations

import ctypes as C

from agenttrace.kernel.bpfsys import BpfError, _bpf

MAP_UPDATE_BATCH = 26          # enum bpf_cmd


class _Batch(C.Structure):
    # the BPF_MAP_*_BATCH member of union bpf_attr
    _fields_ = [("in_batch", C.c_uint64), ("out_batch", C.c_uint64), ("keys", C.c_uint64),
                ("values", C.c_uint64), ("count", C.c_uint32), ("map_fd", C.c_uint32),
                ("elem_flags", C.c_uint64), ("flags", C.c_uint64)]


def delete_stale(table, keep: set[bytes]) -> None:
    """Delete every entry of BCC `table` whose key bytes are not in `keep`."""
    for k in list(table.keys()):
        if bytes(k) not in keep:
            try:
                del table[k]
            except KeyError:
                pass


def update_many(table, keys: bytes, values: bytes, count: int) -> None:
    """Write `count` entries, keys and values packed back to back in the map's layouts, with
    one BPF_MAP_UPDATE_BATCH (the kernel walks them) instead of one bpf(2) call each: 100,000
    allowed names took ~0.6 s of syscalls and ctypes objects. Where the call is refused
    (a kernel or map type without batch updates), or for a table without a plain fd, the
    entries are written one by one; an entry the map refuses raises as `table[k] = v` would."""
    if not count:
        return
    ks, vs = len(keys) // count, len(values) // count
    fd = getattr(table, "map_fd", None)
    done = 0
    if isinstance(fd, int):
        kbuf = C.create_string_buffer(keys, len(keys))
        vbuf = C.create_string_buffer(values, len(values))
        attr = _Batch(0, 0, C.addressof(kbuf), C.addressof(vbuf), count, fd, 0, 0)
        try:
            _bpf(MAP_UPDATE_BATCH, attr)
            return
        except BpfError as e:
            # `count` comes back as the entries written before the refusal; the one-by-one
            # path below goes on from there and raises on a real refusal (E2BIG, ENOMEM)
            done = min(attr.count, count) if e.errno not in (22, 95, 524) else 0
    for i in range(done, count):
        k = table.Key.from_buffer_copy(keys, i * ks)
        v = table.Leaf.from_buffer_copy(values, i * vs)
        table[k] = v
