"""What the node's own network looks like, from netlink (rtnetlink): the subnets of its
interfaces, so peers on the node's own links count as `internal` without configuration.

Only what the defaults do not already cover is returned (RFC 1918 and the rest are internal
anyway), so on most nodes this adds nothing; on a node with public addresses on its links it
adds those links' subnets. Loopback and link-local addresses are left out (their own scopes).
Read when a session starts and on every daemon reload.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from typing import Iterable, List

log = logging.getLogger("agenttrace")


# rtnetlink (uapi linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h)
_NLMSG_ERROR, _NLMSG_DONE, _RTM_NEWADDR, _RTM_GETADDR = 2, 3, 20, 22
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_HDR = struct.Struct("=IHHII")        # nlmsghdr: len, type, flags, seq, pid
_IFADDR = struct.Struct("=BBBBI")     # ifaddrmsg: family, prefixlen, flags, scope, index
_RTA = struct.Struct("=HH")           # rtattr: len, type


def _align(n: int) -> int:
    return (n + 3) & ~3


def interface_networks() -> List[ipaddress._BaseNetwork]:
    """Every address's network on this netns's interfaces: one RTM_GETADDR dump on a netlink
    socket, read here rather than through pyroute2, whose import was ~0.1 s of each daemon
    start (docs/STARTUP.md). An interface's own address (IFA_LOCAL) before its peer's."""
    out = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as sk:
        sk.bind((0, 0))
        body = _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sk.send(_HDR.pack(_HDR.size + len(body), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)
        while True:
            data = sk.recv(1 << 16)
            if not data:
                return out
            off = 0
            while off + _HDR.size <= len(data):
                length, typ, _flags, _seq, _pid = _HDR.unpack_from(data, off)
                if length < _HDR.size or typ == _NLMSG_DONE:
                    return out
                if typ == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, off + _HDR.size)[0]
                    if err:
                        raise OSError(err, os.strerror(err))
                    return out
                if typ == _RTM_NEWADDR:
                    fam, plen, _f, _scope, _index = _IFADDR.unpack_from(data, off + _HDR.size)
                    attrs, a, end = {}, off + _HDR.size + _IFADDR.size, off + length
                    while a + _RTA.size <= end:
                        alen, atype = _RTA.unpack_from(data, a)
                        if alen < _RTA.size:
                            break
                        attrs[atype] = data[a + _RTA.size:a + alen]
                        a += _align(alen)
                    raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
                    if raw and fam in (socket.AF_INET, socket.AF_INET6):
                        try:
                            out.append(ipaddress.ip_network(f"{socket.inet_ntop(fam, raw)}/{plen}", strict=False))
                        except (ValueError, OSError):
                            pass
                off += _align(length)


def node_subnets(exclude: Iterable[str] = ()) -> List[str]:
    """The node's own subnets not already covered by the default internal ranges or by
    `exclude` (more CIDRs). Empty, with a log line, when netlink cannot be read."""
    from agenttrace.enrich.scope import DEFAULT_INTERNAL, DEFAULT_METADATA
    covered = [ipaddress.ip_network(c, strict=False) for c in (*DEFAULT_INTERNAL, *DEFAULT_METADATA, *exclude)]
    try:
        nets = interface_networks()
    except Exception as e:      # no netlink (seccomp): the defaults still hold
        log.warning("agenttrace: node subnets unknown (netlink: %s); only the configured internal ranges apply", e)
        return []
    out: List[str] = []
    for n in nets:
        if n.is_loopback or n.is_link_local or n.is_multicast:
            continue
        if any(n.version == c.version and n.subnet_of(c) for c in covered):
            continue
        s = str(n)
        if s not in out:
            out.append(s)
    return out
