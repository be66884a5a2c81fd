"""The loaded probes without BCC in the process: maps made from a compiled object
(tracer/kernel/probecache.py), programs loaded on demand, tracepoints attached the way BCC's
naming convention says (`tracepoint__CAT__EVENT`, `raw_tracepoint__EVENT`).

It answers the part of BCC's `BPF` object the package and its tests use: `obj[b"map"]`,
`load_func(name, prog_type, attach_type=...)` returning something with `.fd`,
`ring_buffer_poll`/`ring_buffer_consume` for callback readers, and `cleanup()`.
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from agenttrace.kernel import bpfsys


@dataclass
class Function:
    name: bytes
    fd: int


class LoadedObject:
    def __init__(self, obj: dict, tracefs: Path):
        self._obj = obj
        self._tracefs = tracefs
        self._license = obj["license"].encode()
        self.tables: dict[bytes, bpfsys.Map] = {}
        self.funcs: dict[bytes, Function] = {}
        self._attach_fds: list[int] = []
        # BCC's names for the attachments (ops/metrics.py reads them): b"cat:event" -> perf fd,
        # b"event" -> raw tracepoint fd
        self.tracepoint_fds: dict[bytes, int] = {}
        self.raw_tracepoint_fds: dict[bytes, int] = {}
        self._fds: list[int] = []
        try:
            for name, m in obj["maps"].items():
                fd = bpfsys.map_create(m["type"], m["key_size"], m["value_size"], m["max_entries"],
                                       m["flags"], name)
                self._fds.append(fd)
                self.tables[name.encode()] = bpfsys.Map(name, fd, m["type"], m["key"], m["leaf"],
                                                        m["max_entries"])
        except BaseException:
            self.cleanup()
            raise

    def __getitem__(self, name: bytes) -> bpfsys.Map:
        if isinstance(name, str):
            name = name.encode()
        return self.tables[name]

    def __contains__(self, name) -> bool:
        return (name.encode() if isinstance(name, str) else name) in self.tables

    def _insns(self, name: str) -> bytes:
        p = self._obj["programs"][name]
        code = bytearray(base64.b64decode(p["insns"]))
        for idx, mapname in p["maps"]:
            code[idx * 8 + 4:idx * 8 + 8] = self.tables[mapname.encode()].map_fd.to_bytes(4, "little")
        return bytes(code)

    def load_func(self, func_name, prog_type: int, attach_type: int = -1) -> Function:
        name = func_name.decode() if isinstance(func_name, bytes) else func_name
        key = name.encode()
        if key in self.funcs:
            return self.funcs[key]
        if name not in self._obj["programs"]:
            raise KeyError(f"Unknown program {name}")
        try:
            fd = bpfsys.prog_load(prog_type, self._insns(name), self._license, name, attach_type)
        except bpfsys.BpfError as e:
            raise bpfsys.BpfError(e.errno, f"Failed to load BPF program {name}: {e.strerror}") from None
        self._fds.append(fd)
        fn = Function(key, fd)
        self.funcs[key] = fn
        return fn

    def preload(self, wanted: list[tuple[str, int, int]]) -> None:
        """Load these (program, prog type, attach type) at once, one thread per CPU: the
        verifier runs in the bpf(2) call, which ctypes makes without the GIL, and the flow
        programs are most of the start (docs/STARTUP.md). Errors surface in load_func."""
        from concurrent.futures import ThreadPoolExecutor
        todo = [w for w in wanted if w[0] in self._obj["programs"] and w[0].encode() not in self.funcs]
        if len(todo) < 2:
            return
        # heaviest first, so the long verifications start together
        todo.sort(key=lambda w: -len(self._obj["programs"][w[0]]["insns"]))

        def one(w):
            try:
                self.load_func(w[0], w[1], w[2])
            except (bpfsys.BpfError, KeyError):
                pass     # load_func raises it again, in order, for the caller
        with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as ex:
            list(ex.map(one, todo))

    def autoload(self) -> None:
        """What BCC does after compiling: load and attach the tracepoint programs."""
        for name in self._obj["programs"]:
            if name.startswith("tracepoint__"):
                cat, _, event = name[len("tracepoint__"):].partition("__")
                fn = self.load_func(name, bpfsys.PROG_TYPES["TRACEPOINT"])
                fd = bpfsys.attach_tracepoint(fn.fd, self._tracefs, cat, event)
                self._attach_fds.append(fd)
                self.tracepoint_fds[f"{cat}:{event}".encode()] = fd
            elif name.startswith("raw_tracepoint__"):
                fn = self.load_func(name, bpfsys.PROG_TYPES["RAW_TRACEPOINT"])
                event = name[len("raw_tracepoint__"):]
                fd = bpfsys.attach_raw_tracepoint(fn.fd, event)
                self._attach_fds.append(fd)
                self.raw_tracepoint_fds[event.encode()] = fd

    # callback readers (BCC's ring_buffer_poll/consume): every map opened with open_ring_buffer
    def _readers(self):
        return [t._cb for t in self.tables.values() if t._cb is not None]

    def ring_buffer_poll(self, timeout: int = -1) -> None:
        rs = self._readers()
        for i, r in enumerate(rs):
            r.poll(timeout if i == 0 else 0)

    def ring_buffer_consume(self) -> None:
        for r in self._readers():
            r.consume()

    def cleanup(self) -> None:
        for t in self.tables.values():
            if t._cb is not None:
                t._cb.close()
                t._cb = None
        for fd in self._attach_fds + self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._attach_fds.clear()
        self._fds.clear()
        self.tracepoint_fds.clear()
        self.raw_tracepoint_fds.clear()
