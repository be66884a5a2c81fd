"""Compile the probes out of the tracer's process, once per kernel, flags and source.

Measured (docs/STARTUP.md): BCC's in-process compile was 2.7 s of a 4.5 s start and took the
tracer to ~200 MB resident (libLLVM/libclang relocations, the compiler's heap); every later
start paid it again for the same bytecode. So a child process (`python -m
agenttrace.kernel.probecache`) compiles with BCC and writes what the kernel needs -- each
program's instructions with its map references left as (instruction, map name), each map's
type, sizes, flags and BCC's key/leaf type descriptions -- to a cache file named by the hash of
everything that can change the bytecode. The tracer creates the maps, patches their fds into
the instructions and loads the programs itself (tracer/kernel/bpfsys.py): the kernel still
verifies every program at every start; only the compiler is skipped.

The cache is code the kernel will run as root: it lives in a root-owned 0700 directory and a
file is used only if root owns it and nobody else can write it or its directory.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from agenttrace.kernel import bpfsys

FORMAT = 1
DEFAULT_DIR = Path("/var/cache/agenttrace/probes")
KEEP = 192          # most recently used objects kept (~0.2-0.4 MB each): each edit of a probe or new
                    # flag set adds one, and the test suite alone loads about 64 sets, which a smaller
                    # cache evicted. A hit renews its file's mtime, so what a node starts with (what
                    # `agenttrace prepare` put there at install) outlives sets compiled once since.
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1


class CompileError(Exception):
    pass


def cache_dir() -> Path | None:
    """AGENTTRACE_PROBE_CACHE=DIR moves the cache, =off compiles every time (still in a child).
    Under systemd the unit's CacheDirectory= (writable despite ProtectSystem=strict) is used."""
    v = os.environ.get("AGENTTRACE_PROBE_CACHE", "")
    if v.lower() in ("off", "0", "no"):
        return None
    if v:
        return Path(v)
    sd = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    return Path(sd) / "probes" if sd else DEFAULT_DIR


def _bcc_identity() -> str:
    # the compiler's version decides the bytecode; found without importing bcc (that would
    # map libLLVM into this process, what this module exists to avoid)
    for p in ("/usr/lib/x86_64-linux-gnu/libbcc.so.0", "/usr/lib/aarch64-linux-gnu/libbcc.so.0",
              "/usr/lib/libbcc.so.0", "/usr/lib64/libbcc.so.0"):
        try:
            real = os.path.realpath(p)
            st = os.stat(real)
            return f"{real}:{st.st_size}:{int(st.st_mtime)}"
        except OSError:
            continue
    return "unknown"


def cache_key(source: str, cflags: list[str]) -> str:
    u = os.uname()
    h = hashlib.sha256()
    # the environment, not the interpreter's name: `python` and `python3` of one venv (the
    # tests' and the entry point's) compiled every flag set twice; two checkouts stay apart
    for part in (str(FORMAT), u.release, u.version, u.machine, _bcc_identity(),
                 os.path.realpath(sys.prefix), "\0".join(cflags), source):
        h.update(part.encode())
        h.update(b"\0\1")
    return h.hexdigest()[:40]


def _trusted(path: Path) -> bool:
    try:
        for p in (path, path.parent):
            st = os.stat(p)
            if st.st_uid != 0 or st.st_mode & 0o022:
                return False
        return True
    except OSError:
        return False


def _read(path: Path) -> dict | None:
    if not path.is_file() or not _trusted(path):
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if obj.get("format") == FORMAT else None


def memo(kind: str, parts: list[str], compute):
    """compute() once per `parts` (JSON-able result), kept beside the compiled probes: for
    facts about the running kernel that cost more to find than to read (the BTF offsets)."""
    hit = recall(kind, parts)
    if hit is not None:
        return hit
    value = compute()
    remember(kind, parts, value)
    return value


def _memo_name(kind: str, parts: list[str]) -> str:
    return f"{kind}-{hashlib.sha256(chr(0).join([str(FORMAT), kind] + parts).encode()).hexdigest()[:40]}.json"


def recall(kind: str, parts: list[str]):
    """What remember() kept for `parts`, or None (no cache, nothing kept, or not trusted)."""
    d = cache_dir()
    hit = _read(d / _memo_name(kind, parts)) if d is not None else None
    return hit["value"] if hit is not None else None


def remember(kind: str, parts: list[str], value) -> None:
    d = cache_dir()
    if d is not None:
        _write(d, _memo_name(kind, parts), {"format": FORMAT, "value": value})


def _write(d: Path, name: str, obj: dict) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, d / name)
        files = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in files[:-KEEP]:
            old.unlink()
    except OSError:
        pass      # an unwritable cache only costs the next start its compile


def cached(source: str, cflags: list[str]) -> dict | None:
    """The compiled object for this source and flags if the cache has it (nothing compiled)."""
    d = cache_dir()
    if d is None:
        return None
    path = d / f"{cache_key(source, cflags)}.json"
    obj = _read(path)
    if obj is not None:
        try:
            os.utime(path)      # used now: _write evicts the least recently used first
        except OSError:
            pass
    return obj


def compiled(source: str, cflags: list[str]) -> tuple[dict, bool]:
    """The compiled object for this source and flags, and whether it came from the cache."""
    hit = cached(source, cflags)
    if hit is not None:
        return hit, True
    d = cache_dir()
    key = cache_key(source, cflags)
    obj = _compile_in_child(source, cflags)
    if d is not None:
        _write(d, f"{key}.json", obj)
    return obj, False


def _compile_in_child(source: str, cflags: list[str]) -> dict:
    req = json.dumps({"source": source, "cflags": cflags})
    # the same interpreter imports this package from where the parent did (venv or wheel)
    p = subprocess.run([sys.executable, "-m", "agenttrace.kernel.probecache"], input=req.encode(),
                       capture_output=True)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()
        raise CompileError(err[-4000:] or f"compiler child exited {p.returncode}")
    return json.loads(p.stdout)


# --- the child -----------------------------------------------------------------------------
def _compile(source: str, cflags: list[str]) -> dict:
    import ctypes as C
    from bcc import BPF, lib

    lib.bpf_num_tables.restype = C.c_ulonglong
    lib.bpf_num_tables.argtypes = [C.c_void_p]
    lib.bpf_table_name.restype = C.c_char_p
    lib.bpf_table_name.argtypes = [C.c_void_p, C.c_ulonglong]

    class _NoAutoload(BPF):
        # BCC loads and attaches tracepoint programs right after compiling; here nothing is
        # loaded: the tracer loads what it needs from the cached instructions
        def _trace_autoload(self):
            pass

    b = _NoAutoload(text=source.encode(), cflags=cflags)
    m = b.module
    maps, by_fd = {}, {}
    for i in range(lib.bpf_num_tables(m)):
        name = lib.bpf_table_name(m, i)
        fd = lib.bpf_table_fd(m, name)
        info = bpfsys.map_info(fd)
        maps[name.decode()] = {
            "type": info.type, "key_size": info.key_size, "value_size": info.value_size,
            "max_entries": info.max_entries, "flags": info.map_flags,
            "key": json.loads(lib.bpf_table_key_desc(m, name)),
            "leaf": json.loads(lib.bpf_table_leaf_desc(m, name)),
        }
        by_fd[fd] = name.decode()
    progs = {}
    for i in range(lib.bpf_num_functions(m)):
        name = lib.bpf_function_name(m, i)
        size = lib.bpf_function_size(m, name)
        code = bytearray(C.string_at(lib.bpf_function_start(m, name), size))
        relocs = []
        for off in range(0, len(code) - 8, 8):
            if code[off] == _LD_IMM64 and (code[off + 1] >> 4) == _PSEUDO_MAP_FD:
                fd = int.from_bytes(code[off + 4:off + 8], "little", signed=True)
                if fd not in by_fd:
                    raise CompileError(f"program {name.decode()} refers to map fd {fd} BCC did not name")
                relocs.append([off // 8, by_fd[fd]])
                code[off + 4:off + 8] = b"\0\0\0\0"
        progs[name.decode()] = {"insns": base64.b64encode(bytes(code)).decode(), "maps": relocs}
    return {"format": FORMAT, "license": lib.bpf_module_license(m).decode(), "maps": maps,
            "programs": progs}


def main() -> int:
    req = json.loads(sys.stdin.read())
    try:
        obj = _compile(req["source"], req["cflags"])
    except Exception as e:      # BCC raises bare Exception; clang's own errors are on stderr
        print(f"{e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(obj))
    return 0


if __name__ == "__main__":
    sys.exit(main())
