"""The one rule every map writer follows: write the new entries first, then delete what is no
longer wanted, so a rewrite (start, reload) never opens a window in which a forbidden entry is
missing."""
from __future__ import annotations

import ctypes as C

from agenttrace.kernel.bpfsys import BpfError, _bpf

MAP_LOOKUP_BATCH, MAP_UPDATE_BATCH = 24, 26          # enum bpf_cmd
_ENOENT, _ENOSPC = 2, 28
_UNSUPPORTED = (22, 95, 524)    # EINVAL, EOPNOTSUPP, ENOTSUPP: no batch ops for this map/kernel


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
            done = min(attr.count, count) if e.errno not in _UNSUPPORTED else 0
    for i in range(done, count):
        k = table.Key.from_buffer_copy(keys, i * ks)
        v = table.Leaf.from_buffer_copy(values, i * vs)
        table[k] = v


def key_bytes(table, chunk: int = 8192) -> list:
    """The key bytes of every entry, read with BPF_MAP_LOOKUP_BATCH (a few calls for 100,000
    entries, where walking them with BPF_MAP_GET_NEXT_KEY took one call and one ctypes key
    each: ~0.5 s at a reload of a 100,000-name allow-list). A table without a plain fd, or a
    map or kernel without batch lookups, is walked key by key."""
    fd = getattr(table, "map_fd", None)
    if not isinstance(fd, int) or getattr(table, "percpu", False):
        return [bytes(k) for k in table.keys()]
    ks, vs = C.sizeof(table.Key), C.sizeof(table.Leaf)
    keys = C.create_string_buffer(ks * chunk)
    vals = C.create_string_buffer(vs * chunk)
    # a hash map's batch position is a bucket index (u32); u64 leaves room for other types
    inb, outb = C.c_uint64(0), C.c_uint64(0)
    out: list = []
    first = True
    while True:
        attr = _Batch(0 if first else C.addressof(inb), C.addressof(outb), C.addressof(keys),
                      C.addressof(vals), chunk, fd, 0, 0)
        done = False
        try:
            _bpf(MAP_LOOKUP_BATCH, attr)
        except BpfError as e:
            if e.errno == _ENOENT:
                done = True                  # the last batch (count says how many it holds)
            elif first and e.errno in _UNSUPPORTED + (_ENOSPC,):
                return [bytes(k) for k in table.keys()]
            else:
                raise
        raw = keys.raw
        out.extend(raw[i * ks:(i + 1) * ks] for i in range(min(attr.count, chunk)))
        if done:
            return out
        inb.value = outb.value
        first = False
