"""Socket fencing: which sockets an agent may not create, as specs `FAMILY[:TYPE[:PROTO]]` --
`inet:raw`, `inet6:raw`, `inet:dgram:icmp`, `packet`, `netlink:raw:0`, `vsock`.

One map (`sock_fence`, declared in probes/sock.c), two hooks: cgroup/sock_create (sock.c)
sees AF_INET and AF_INET6 only -- on the kernels measured packet, netlink, unix and vsock
sockets never reach it; the optional `packet` probe feature (probes/packet.c, a
syscalls:sys_enter/exit_socket pair) looks the other families up in the same map. Without
that feature, entries of other families are enforced only for `run -- CMD` (the command loses
CAP_NET_RAW, tracer/session/capdrop.py: packet sockets) and `lifecycle/started` names them
under `socket_fence.unseen`, so a fence that no hook applies is said, not silent."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Iterable, List

from agenttrace.kernel.mapwrite import delete_stale

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}
# families only the `packet` probe (the socket() syscall tracepoint) sees
OTHER_FAMILIES = {"unix": 1, "ax25": 3, "ipx": 4, "appletalk": 5, "x25": 9, "key": 15, "netlink": 16,
                  "packet": 17, "rds": 21, "llc": 26, "can": 29, "tipc": 30, "bluetooth": 31,
                  "alg": 38, "vsock": 40, "kcm": 41, "qipcrtr": 42, "smc": 43, "xdp": 44, "mctp": 45}
ALL_FAMILIES = {**FAMILIES, **OTHER_FAMILIES}
INET_FAMILIES = frozenset(FAMILIES.values())
TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM, "raw": socket.SOCK_RAW,
         "rdm": 4, "seqpacket": socket.SOCK_SEQPACKET}
PROTOS = {"ip": 0, "icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "ipv6": 41, "gre": 47, "esp": 50,
          "icmpv6": 58, "sctp": 132, "udplite": 136, "raw": 255}
ANY = 0xFFFF
DENY, REPORT = 1, 2                    # AT_SOCK_* in probes/agenttrace.h
DEFAULT_FENCE = ("inet:raw", "inet6:raw", "packet")
FENCE_RULE = "escape-socket-fence"
_FAMILY_NAMES = {v: k for k, v in ALL_FAMILIES.items()}
_TYPE_NAMES = {v: k for k, v in TYPES.items()}
_PROTO_NAMES = {v: k for k, v in PROTOS.items()}


class FenceError(ValueError):
    pass


@dataclass(frozen=True)
class FenceEntry:
    family: int
    type: int          # ANY = any type
    protocol: int      # ANY = any protocol
    action: int = DENY


def parse_fence(spec: str) -> FenceEntry:
    parts = spec.strip().lower().split(":")
    if not 1 <= len(parts) <= 3:
        raise FenceError(f"socket fence {spec!r}: expected FAMILY[:TYPE[:PROTO]]")
    fam = ALL_FAMILIES.get(parts[0])
    if fam is None and parts[0].isdigit() and 0 < int(parts[0]) < 64:
        fam = int(parts[0])        # AF_MAX is 46 on 6.18; a number names a newer family
    if fam is None:
        raise FenceError(f"socket fence {spec!r}: unknown family {parts[0]!r} "
                         f"({', '.join(ALL_FAMILIES)}, or an AF_* number)")
    typ = ANY if len(parts) < 2 or parts[1] in ("", "any") else TYPES.get(parts[1])
    if typ is None:
        raise FenceError(f"socket fence {spec!r}: unknown type {parts[1]!r} ({', '.join(TYPES)})")
    proto = ANY
    if len(parts) == 3 and parts[2] not in ("", "any"):
        p = parts[2]
        # inet: IPPROTO_* (< 256); other families: the number as passed to socket(2) (for
        # packet sockets htons(ETH_P_*), which is why `packet` alone is the usual entry)
        limit = 256 if fam in INET_FAMILIES else ANY
        proto = int(p) if p.isdigit() and int(p) < limit else PROTOS.get(p) if fam in INET_FAMILIES else None
        if proto is None:
            raise FenceError(f"socket fence {spec!r}: unknown protocol {p!r}")
    return FenceEntry(fam, typ, proto)


def write_fence(table, entries: Iterable[FenceEntry], policy_id: int = 1) -> None:
    keep = set()
    for e in entries:
        k = table.Key()
        k.family, k.type, k.protocol, k.pad = e.family, e.type, e.protocol, 0
        v = table.Leaf()
        v.policy_id, v.action = policy_id, e.action
        table[k] = v
        keep.add(bytes(k))
    delete_stale(table, keep)


def unseen(entries: Iterable[FenceEntry], features: Iterable[str], dropped_caps=()) -> List[str]:
    """Entries nothing applies: other families while the `packet` feature is off, except
    packet sockets of a command that lost CAP_NET_RAW (the kernel refuses those itself)."""
    feats = set(features)
    no_raw = 13 in set(dropped_caps)          # CAP_NET_RAW
    out = []
    for e in entries:
        if e.family in INET_FAMILIES:
            hooked = "sock" in feats
        else:
            hooked = "packet" in feats or (no_raw and e.family == socket.AF_PACKET)
        if not hooked:
            out.append(spec_of(e))
    return out


def spec_of(e: FenceEntry) -> str:
    s = _FAMILY_NAMES.get(e.family, str(e.family))
    if e.type != ANY or e.protocol != ANY:
        s += ":" + ("any" if e.type == ANY else _TYPE_NAMES.get(e.type, str(e.type)))
    if e.protocol != ANY:
        s += ":" + (_PROTO_NAMES.get(e.protocol, str(e.protocol)) if e.family in INET_FAMILIES
                    else str(e.protocol))
    return s


def socket_body(o) -> dict:
    from agenttrace.kernel.wire import SOCK_F_KILLED, SOCK_F_SYSCALL, VERDICT_BLOCKED
    inet = o.family in INET_FAMILIES
    flags = getattr(o, "flags", 0)
    body = {"family": _FAMILY_NAMES.get(o.family, str(o.family)),
            "type": _TYPE_NAMES.get(o.type, str(o.type)),
            "protocol": _PROTO_NAMES.get(o.protocol, str(o.protocol)) if inet else str(o.protocol),
            "verdict": "killed" if flags & SOCK_F_KILLED else
                       "blocked" if o.verdict == VERDICT_BLOCKED else "allowed",
            "fenced": o.action == DENY,
            "hook": "sys_socket" if flags & SOCK_F_SYSCALL else "sock_create"}
    if flags & SOCK_F_SYSCALL and getattr(o, "error", 0):
        body["error"] = errno_name(o.error)
    return body


def errno_name(n: int) -> str:
    import errno
    return errno.errorcode.get(n, str(n))


def default_entries(specs: Iterable[str] = DEFAULT_FENCE) -> List[FenceEntry]:
    return [parse_fence(s) for s in specs]
