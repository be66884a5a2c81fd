"""What the node's own network looks like, from netlink (pyroute2): the subnets of its
interfaces, so peers on the node's own links count as `internal` without configuration.

Only what the defaults do not already cover is returned (RFC 1918 and the rest are internal
anyway), so on most nodes this adds nothing; on a node with public addresses on its links it
adds those links' subnets. Loopback and link-local addresses are left out (their own scopes).
Read when a session starts and on every daemon reload.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Iterable, List

log = logging.getLogger("agenttrace")


def interface_networks() -> List[ipaddress._BaseNetwork]:
    """Every address's network on this netns's interfaces (RTM_GETADDR)."""
    from pyroute2 import IPRoute
    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not addr:
                continue
            try:
                out.append(ipaddress.ip_network(f"{addr}/{msg['prefixlen']}", strict=False))
            except ValueError:
                continue
    return out


def node_subnets(exclude: Iterable[str] = ()) -> List[str]:
    """The node's own subnets not already covered by the default internal ranges or by
    `exclude` (more CIDRs). Empty, with a log line, when netlink cannot be read."""
    from agenttrace.enrich.scope import DEFAULT_INTERNAL, DEFAULT_METADATA
    covered = [ipaddress.ip_network(c, strict=False) for c in (*DEFAULT_INTERNAL, *DEFAULT_METADATA, *exclude)]
    try:
        nets = interface_networks()
    except Exception as e:      # no netlink (seccomp, no pyroute2): the defaults still hold
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
