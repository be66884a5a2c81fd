"""Capabilities `run -- CMD` takes away from the agent before exec.

Why: a packet socket (AF_PACKET) never reaches cgroup/sock_create, and a syscall tracepoint
misses ia32 `int 0x80` socketcall and io_uring's IORING_OP_SOCKET. Without CAP_NET_RAW the
kernel itself refuses packet and raw IP sockets with EPERM on every one of those paths, so
for an agent that `run` starts the fence holds whatever way it asks.

Dropped from the bounding set (no exec, setuid binary or file capability can give them back:
a binary whose file capabilities name a dropped one, such as `ping` with cap_net_raw+ep,
fails to exec with EPERM), then from the ambient, inheritable, permitted and effective sets.
Done in the forked child, before exec and before any `--user` switch (the bounding-set drop
itself needs CAP_SETPCAP)."""
from __future__ import annotations

import ctypes
import os
from typing import Iterable, List

# uapi linux/capability.h; the names people pass are those of capabilities(7)
CAPS = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4, "kill": 5,
    "setgid": 6, "setuid": 7, "setpcap": 8, "linux_immutable": 9, "net_bind_service": 10,
    "net_broadcast": 11, "net_admin": 12, "net_raw": 13, "ipc_lock": 14, "ipc_owner": 15,
    "sys_module": 16, "sys_rawio": 17, "sys_chroot": 18, "sys_ptrace": 19, "sys_pacct": 20,
    "sys_admin": 21, "sys_boot": 22, "sys_nice": 23, "sys_resource": 24, "sys_time": 25,
    "sys_tty_config": 26, "mknod": 27, "lease": 28, "audit_write": 29, "audit_control": 30,
    "setfcap": 31, "mac_override": 32, "mac_admin": 33, "syslog": 34, "wake_alarm": 35,
    "block_suspend": 36, "audit_read": 37, "perfmon": 38, "bpf": 39, "checkpoint_restore": 40,
}
_NAMES = {v: k for k, v in CAPS.items()}
CAP_NET_RAW = CAPS["net_raw"]

_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAP_V3 = 0x20080522
_SYS_CAPGET, _SYS_CAPSET = 125, 126        # x86_64
if os.uname().machine in ("aarch64", "arm64", "riscv64"):
    _SYS_CAPGET, _SYS_CAPSET = 90, 91      # the generic syscall table


class CapError(ValueError):
    pass


def cap_name(cap: int) -> str:
    return "CAP_" + _NAMES.get(cap, str(cap)).upper()


def parse_caps(spec: str) -> List[int]:
    """`net_raw,net_admin` (CAP_ prefix and case optional); `none` or `` = nothing."""
    out: List[int] = []
    s = spec.strip().lower()
    if s in ("", "none"):
        return out
    for part in s.split(","):
        name = part.strip()
        if name.startswith("cap_"):
            name = name[4:]
        if name not in CAPS:
            raise CapError(f"--drop-caps: unknown capability {part.strip()!r} "
                           f"(capabilities(7) names such as net_raw, net_admin)")
        if CAPS[name] not in out:
            out.append(CAPS[name])
    return out


def caps_for_fence(entries: Iterable) -> List[int]:
    """What the kernel needs taken away to refuse the fenced sockets itself: CAP_NET_RAW when
    the fence denies packet sockets or raw IP sockets (those are exactly the sockets that
    capability guards); nothing for netlink, vsock and the rest, which need no capability."""
    import socket
    from agenttrace.kernel.sockfence import ANY, DENY
    for e in entries:
        if e.action != DENY:
            continue
        if e.family == socket.AF_PACKET:
            return [CAP_NET_RAW]
        if e.family in (socket.AF_INET, socket.AF_INET6) and e.type in (socket.SOCK_RAW, ANY):
            return [CAP_NET_RAW]
    return []


# What a root agent could turn against the tracer or the kernel's fences, which `run -- CMD`
# takes away in enforce mode with the fence's own (caps_for_enforce). The agent is an adversary
# with root in the worst case: with CAP_SYS_ADMIN, CAP_BPF or CAP_NET_ADMIN it could detach or
# replace the cgroup programs that hold the fences (they are pinned, and still one bpf(2) call
# away), read the probes' maps, or mount and unshare its way around them; CAP_PERFMON opens
# perf events and kprobes; CAP_SYS_MODULE loads code into the kernel; CAP_SYS_PTRACE attaches
# to the tracer itself (without it, ptrace of a process holding more capabilities is refused
# even for uid 0); CAP_SYS_RAWIO reads and writes /dev/mem and I/O ports. A container runtime's
# default set leaves all seven out too, so a coding agent built to run in a container does not
# need them; one that does (nsenter into a namespace, docker-in-docker) names what it loses
# instead: `--drop-caps net_raw`.
TAMPER_CAPS = tuple(CAPS[n] for n in ("sys_admin", "bpf", "perfmon", "net_admin", "sys_module",
                                       "sys_ptrace", "sys_rawio"))


def caps_for_enforce(entries: Iterable) -> List[int]:
    """`--drop-caps auto` in enforce mode: the fence's capability and the tamper set."""
    return caps_for_fence(entries) + [c for c in TAMPER_CAPS]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop(caps: Iterable[int]) -> None:
    """Drop `caps` from this process's bounding, ambient, inheritable, permitted and effective
    sets. Raises OSError when the kernel refuses (in the child that fails the spawn: an agent
    that keeps what it was meant to lose must not start)."""
    caps = list(caps)
    if not caps:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for c in caps:
        if libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(c), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap_name(c)}): {os.strerror(err)}")
    # ambient capabilities survive exec on their own; an empty ambient set is the ordinary case
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    hdr = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    if libc.syscall(_SYS_CAPGET, ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    for c in caps:
        bit = ~(1 << (c % 32)) & 0xFFFFFFFF
        d = data[c // 32]
        d.effective &= bit
        d.permitted &= bit
        d.inheritable &= bit
    if libc.syscall(_SYS_CAPSET, ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def bounding_set(pid: int | str = "self") -> int:
    """CapBnd of a process, from /proc (tests and `lifecycle` checks)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    return 0
