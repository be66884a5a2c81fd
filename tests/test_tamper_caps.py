"""`agenttrace run --mode enforce -- CMD` takes from the command what a root agent could turn
against the tracer and its fences (tracer/session/capdrop.py TAMPER_CAPS): with the default,
asking the kernel for its BPF programs (the first step of detaching the pinned fences), reading
the tracer's memory and unsharing a mount namespace all fail with EPERM/EACCES; the opt-out
(`--drop-caps net_raw`) gives them back, which is what shows the first half is the drop."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import AGENTTRACE, need_bpf

PY = sys.executable
TAMPER = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
out = {}
# bpf(BPF_PROG_GET_NEXT_ID): the walk to any loaded program; CAP_SYS_ADMIN only
attr = (ctypes.c_uint32 * 3)(0, 0, 0)
r = libc.syscall(321, 11, ctypes.byref(attr), ctypes.sizeof(attr))
out["bpf_next_id"] = 0 if r == 0 else ctypes.get_errno()
# the tracer (the command's parent) has every capability: its memory needs CAP_SYS_PTRACE
try:
    os.close(os.open(f"/proc/{os.getppid()}/mem", os.O_RDONLY))
    out["tracer_mem"] = 0
except OSError as e:
    out["tracer_mem"] = e.errno
# unshare(CLONE_NEWNS) in a child: a private mount table is CAP_SYS_ADMIN's
pid = os.fork()
if pid == 0:
    os._exit(0 if libc.unshare(0x00020000) == 0 else ctypes.get_errno())
out["unshare_mnt"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
out["capbnd"] = int(open("/proc/self/status").read().split("CapBnd:")[1].split()[0], 16)
print(json.dumps(out), flush=True)
"""
BITS = {"CAP_SYS_ADMIN": 21, "CAP_BPF": 39, "CAP_PERFMON": 38, "CAP_NET_ADMIN": 12,
        "CAP_SYS_MODULE": 16, "CAP_SYS_PTRACE": 19, "CAP_SYS_RAWIO": 17, "CAP_NET_RAW": 13}


def _run(tmp_path, *args):
    out = tmp_path / f"ev{len(list(tmp_path.iterdir()))}.jsonl"
    p = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", "--no-rules", "-o", str(out), *args,
                        "--", PY, "-c", TAMPER], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    (st,) = [r for r in recs if r["kind"] == "lifecycle" and r["phase"] == "started"]
    return json.loads(p.stdout.strip().splitlines()[-1]), st


def test_enforce_takes_the_tamper_capabilities_by_default(tmp_path):
    need_bpf()
    got, st = _run(tmp_path)
    assert got["bpf_next_id"] == 1          # EPERM
    assert got["tracer_mem"] in (1, 13)     # EPERM / EACCES
    assert got["unshare_mnt"] == 1
    for name, bit in BITS.items():
        assert not got["capbnd"] & (1 << bit), name
    assert sorted(st["capabilities_dropped"]) == sorted(BITS)


def test_naming_the_drop_gives_them_back(tmp_path):
    need_bpf()
    got, st = _run(tmp_path, "--drop-caps", "net_raw")
    assert st["capabilities_dropped"] == ["CAP_NET_RAW"]
    assert got["bpf_next_id"] == 0 and got["tracer_mem"] == 0 and got["unshare_mnt"] == 0
    assert got["capbnd"] & (1 << BITS["CAP_SYS_ADMIN"]) and not got["capbnd"] & (1 << BITS["CAP_NET_RAW"])


@pytest.fixture
def netns():
    """A named network namespace of this test's own (`ip netns`): its name and inode."""
    need_bpf()
    import os
    ns = f"at-tamper-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns, os.stat(f"/run/netns/{ns}").st_ino
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=True)


def test_netns_is_entered_before_the_drop(tmp_path, netns):
    # an agent meant to live in a network namespace can no longer enter one itself in enforce
    # mode (setns needs CAP_SYS_ADMIN); `--netns` enters it for the command, before the drop
    ns, want = netns
    out = tmp_path / "ev.jsonl"
    p = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", "--no-rules", "-o", str(out), "--netns", ns,
                        "--", PY, "-c", "import os; print(os.stat('/proc/self/ns/net').st_ino)"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(p.stdout.strip()) == want
    # entering one by hand, as tests did with nsenter, is what the drop now refuses
    p = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", "--no-rules", "-o", str(out), "--",
                        "nsenter", f"--net=/run/netns/{ns}", "true"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Operation not permitted" in p.stderr, (p.returncode, p.stderr[-2000:])


def test_bad_netns_is_refused_before_anything_starts(tmp_path):
    out = tmp_path / "ev.jsonl"
    p = subprocess.run([AGENTTRACE, "run", "-o", str(out), "--netns", "no-such-ns-here", "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--netns: no network namespace 'no-such-ns-here' (/run/netns/no-such-ns-here" in p.stderr
    assert not out.exists()
    p = subprocess.run([AGENTTRACE, "run", "-o", str(out), "--netns", "/proc/self/ns/mnt", "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "is not a network namespace" in p.stderr, p.stderr
    p = subprocess.run([AGENTTRACE, "run", "--netns", "x", "--cgroup", "/x"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--netns applies to -- CMD only" in p.stderr


def test_tail_cmd_enters_netns_and_pins_in_enforce(tmp_path, netns):
    # `tail -- CMD` is `run -- CMD` with a terminal sink: the same netns entry before the drop,
    # and in enforce mode the same pinned cgroup programs (its agent is named tail-<its pid>)
    from agenttrace.session.isolation import RUN_PIN_ROOT
    ns, want = netns
    res = tmp_path / "probe.json"     # not stdout: tail's own lines share it
    probe = ("import json, os, sys; "
             f"d = os.path.join({str(RUN_PIN_ROOT)!r}, 'tail-%d' % os.getppid()); "
             "json.dump({'ino': os.stat('/proc/self/ns/net').st_ino, "
             "'pinned': os.path.isdir(d) and bool(os.listdir(d))}, open(sys.argv[1], 'w'))")
    p = subprocess.run([AGENTTRACE, "tail", "--mode", "enforce", "--no-rules", "-o", "json", "--netns", ns,
                        "--", PY, "-c", probe, str(res)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(res.read_text())
    assert got["ino"] == want
    assert got["pinned"] is True, "tail --mode enforce -- CMD ran unpinned"
    p = subprocess.run([AGENTTRACE, "tail", "--netns", "no-such-ns-here", "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--netns: no network namespace 'no-such-ns-here'" in p.stderr, p.stderr
    p = subprocess.run([AGENTTRACE, "tail", "--netns", ns, "--cgroup", "/x"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--netns applies to -- CMD only" in p.stderr, p.stderr
