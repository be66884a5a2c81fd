"""exec_id: unique per process image over a node's boot even when pids are reused, and
parent_exec_id joins each exec to the exec record of the process that created it.

Reuse is forced through /proc/sys/kernel/ns_last_pid (the next pid the kernel hands out),
cycling a handful of pids. A small pid_max in a new pid namespace (per-namespace since 6.14,
and it works on this kernel) would only recycle the namespace's own numbers: the tracer sees
global pids, which keep counting, so it would not test what matters here.

The burst is cheap per exec, so the 10,000 stay affordable on a 2-core CI machine: posix_spawn
(clone with CLONE_VM|CLONE_VFORK, no copy of the interpreter's page tables) instead of
os.fork(), and a 129-byte static ELF that only calls exit(0) instead of /bin/true (no ld.so, no
libc start-up). Measured here: 24 s for the fork + /bin/true loop alone, 3.3 s for this one.
The kernel sees the same thing either way -- a new process of the burst parent, an exec, an
exit -- so the reuse of pids and the join to the parent are exercised as before."""
from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

from agenttrace.enrich.proctable import BOOT_ID

N = 10_000
WORKLOAD = textwrap.dedent(f"""
    import os, sys
    sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
    from pidreuse import pid_lock
    exe = sys.argv[2]
    # the burst holds the lock the other tests that steer pids take (tests/pidreuse.py)
    with pid_lock():
        base = int(open('/proc/sys/kernel/ns_last_pid').read()) + 200
        if base + 8 >= int(open('/proc/sys/kernel/pid_max').read()):
            base = 1000     # near the wrap: a last pid past pid_max is EINVAL
        fd = os.open('/proc/sys/kernel/ns_last_pid', os.O_WRONLY)
        for i in range({N}):
            os.pwrite(fd, str(base + i % 8 - 1).encode(), 0)
            pid = os.posix_spawn(exe, [exe, 'burst-' + str(i)], {{}})
            os.waitpid(pid, 0)
""")


def _exit0_binary(path) -> str:
    """A static x86-64 ELF whose only code is exit(0); elsewhere a copy of /bin/true."""
    if platform.machine() != "x86_64":
        shutil.copy("/bin/true", path)
        return str(path)
    code = bytes([0xB8, 60, 0, 0, 0, 0x31, 0xFF, 0x0F, 0x05])     # mov eax,60; xor edi,edi; syscall
    base, ehsize, phsize = 0x400000, 64, 56
    size = ehsize + phsize + len(code)
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, base + ehsize + phsize, ehsize, 0, 0, ehsize, phsize, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)    # PT_LOAD, R+X
    path.write_bytes(ehdr + phdr + code)
    os.chmod(path, 0o755)
    return str(path)


def test_exec_id_unique_under_forced_pid_reuse(agent_tree, make_session, tmp_path):
    a = agent_tree.agent("burst")
    exe = _exit0_binary(tmp_path / "exit0")
    assert subprocess.run([exe]).returncode == 0
    sess = make_session([agent_tree.root], features=("proc",))
    p = agent_tree.spawn(a, [sys.executable, "-c", WORKLOAD, "burst-parent", exe], stdout=subprocess.DEVNULL)
    try:
        while p.poll() is None:
            sess.tracer.poll(50)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert p.returncode == 0
    sess.wait_for(lambda: sum(1 for r in sess.of("exec") if r["proc"]["exe"] == exe) >= N, timeout=60)
    sess.settle()
    assert sess.tracer.counters()["drops"]["kernel"] == 0
    execs = sess.of("exec")
    burst = [r for r in execs if r["proc"]["exe"] == exe]
    assert len(burst) == N
    pids = {r["proc"]["pid"] for r in burst}
    assert len(pids) < N // 10, f"pid reuse not forced: {len(pids)} distinct pids"
    ids = [r["proc"]["exec_id"] for r in execs]
    assert len(set(ids)) == len(ids), "exec_id reused"
    assert all(i.startswith(BOOT_ID + "-") for i in ids)
    by_id = {r["proc"]["exec_id"]: r for r in execs}
    parent = [r for r in execs if "burst-parent" in r["proc"]["args"]]
    assert len(parent) == 1
    for r in burst:
        joined = by_id.get(r["proc"]["parent_exec_id"])
        assert joined is parent[0], r["proc"]
    # exits name the image that exited: every burst exec has exactly one exit with its id
    exits = {}
    for r in sess.of("exit"):
        exits[r["proc"]["exec_id"]] = exits.get(r["proc"]["exec_id"], 0) + 1
    assert all(exits.get(r["proc"]["exec_id"]) == 1 for r in burst)
