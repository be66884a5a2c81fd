"""Socket fencing: which sockets an agent may not create (probes/sock.c), as specs
`FAMILY[:TYPE[:PROTO]]` -- `inet:raw`, `inet6:raw`, `inet:dgram:icmp`.

Only AF_INET and AF_INET6 can be fenced: cgroup/sock_create never sees other families on the
kernels measured (packet, netlink, unix sockets do not reach it), so naming one is an error
rather than a fence that silently does nothing."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Iterable, List

from agenttrace.kernel.mapwrite import delete_stale

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}
TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM, "raw": socket.SOCK_RAW,
         "seqpacket": socket.SOCK_SEQPACKET}
PROTOS = {"ip": 0, "icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "ipv6": 41, "gre": 47, "esp": 50,
          "icmpv6": 58, "sctp": 132, "udplite": 136, "raw": 255}
ANY = 0xFFFF
DENY, REPORT = 1, 2                    # AT_SOCK_* in probes/agenttrace.h
DEFAULT_FENCE = ("inet:raw", "inet6:raw")
FENCE_RULE = "escape-socket-fence"
_FAMILY_NAMES = {v: k for k, v in FAMILIES.items()}
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
    fam = FAMILIES.get(parts[0])
    if fam is None:
        raise FenceError(f"socket fence {spec!r}: family {parts[0]!r} cannot be fenced here; "
                         f"cgroup/sock_create sees only {', '.join(FAMILIES)}")
    typ = ANY if len(parts) < 2 or parts[1] in ("", "any") else TYPES.get(parts[1])
    if typ is None:
        raise FenceError(f"socket fence {spec!r}: unknown type {parts[1]!r} ({', '.join(TYPES)})")
    proto = ANY
    if len(parts) == 3 and parts[2] not in ("", "any"):
        p = parts[2]
        proto = int(p) if p.isdigit() and int(p) < 256 else PROTOS.get(p)
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


def socket_body(o) -> dict:
    from agenttrace.kernel.wire import VERDICT_BLOCKED
    return {"family": _FAMILY_NAMES.get(o.family, str(o.family)),
            "type": _TYPE_NAMES.get(o.type, str(o.type)),
            "protocol": _PROTO_NAMES.get(o.protocol, str(o.protocol)),
            "verdict": "blocked" if o.verdict == VERDICT_BLOCKED else "allowed",
            "fenced": o.action == DENY}


def default_entries(specs: Iterable[str] = DEFAULT_FENCE) -> List[FenceEntry]:
    return [parse_fence(s) for s in specs]
