"""Destination scope: loopback, internal, metadata or external (the record contract (tracer/schema/event.schema.json)).

One table: `scope_rows()` is what the kernel's LPM trie is filled with (tracer/match/policy.py) and
what `Scoper` answers from in userspace, with the same rule — the longest prefix wins, and on
a tie metadata beats internal beats loopback — so a destination never has one scope in the
kernel's verdict and another in the record that reports it.
"""
from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Iterable, List, Sequence, Tuple

LOOPBACK = ("127.0.0.0/8", "::1/128")

DEFAULT_INTERNAL = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",   # RFC 1918
    "100.64.0.0/10",                                   # RFC 6598 carrier-grade NAT (also Tailscale)
    "169.254.0.0/16",                                  # IPv4 link-local (cloud-internal services live here)
    "fc00::/7",                                        # IPv6 unique local addresses (ULA)
    "fe80::/10",                                       # IPv6 link-local
    "64:ff9b:1::/48",                                  # RFC 8215 local-use NAT64 prefix
)

# Cloud instance-metadata and host-agent endpoints. They hand out credentials (or, for Azure's
# WireServer, the node's extension settings and certificates), so they get their own scope.
METADATA_ENDPOINTS: Tuple[Tuple[str, str], ...] = (
    ("169.254.169.254/32", "IMDS of AWS, GCP, Azure, Oracle OCI, OpenStack, DigitalOcean, Hetzner, IBM"),
    ("fd00:ec2::254/128", "AWS IMDS over IPv6 (Nitro)"),
    ("169.254.170.2/32", "AWS ECS task metadata and credentials"),
    ("169.254.170.23/32", "AWS EKS Pod Identity agent"),
    ("fd00:ec2::23/128", "AWS EKS Pod Identity agent over IPv6"),
    ("fd20:ce::254/128", "GCP metadata server over IPv6"),
    ("168.63.129.16/32", "Azure WireServer / host agent (a public address, metadata in effect)"),
    ("100.100.100.200/32", "Alibaba Cloud ECS metadata"),
    ("fd00:c1::a9fe:a9fe/128", "Oracle OCI IMDS over IPv6"),
    ("fe80::a9fe:a9fe/128", "OpenStack metadata over IPv6 (link-local)"),
    ("169.254.0.23/32", "Tencent Cloud metadata (metadata.tencentyun.com)"),
)
DEFAULT_METADATA = tuple(c for c, _ in METADATA_ENDPOINTS)

# DNS names of the same services; rules/lists.yaml `metadata_names` must hold every one of
# them (tests/test_netscope.py checks), since rules match names from the list.
METADATA_NAMES = (
    "metadata.google.internal", "metadata.goog", "metadata", "instance-data",
    "instance-data.ec2.internal", "metadata.azure.com", "metadata.platformequinix.com",
    "metadata.tencentyun.com", "api.metadata.cloud.ibm.com", "metadata.packet.net",
)

# RFC 6052 well-known NAT64 prefix: 64:ff9b::a.b.c.d reaches IPv4 a.b.c.d through a
# translator, so it takes the scope of the address it embeds.
NAT64_WKP = ipaddress.ip_network("64:ff9b::/96")

_RANK = {"loopback": 0, "internal": 1, "metadata": 2}


def _nat64(net: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    base = int(NAT64_WKP.network_address) | int(net.network_address)
    return ipaddress.ip_network((base, 96 + net.prefixlen))


def scope_rows(internal: Iterable[str] = DEFAULT_INTERNAL,
               metadata: Iterable[str] = DEFAULT_METADATA) -> List[Tuple[str, str]]:
    """(cidr, scope) for every prefix that is not external: loopback, `internal`, `metadata`,
    and the NAT64 (64:ff9b::/96) image of each IPv4 one. One row per prefix; where a prefix
    is listed twice, metadata wins over internal over loopback."""
    best: dict = {}
    for cidrs, scope in ((LOOPBACK, "loopback"), (internal, "internal"), (metadata, "metadata")):
        for c in cidrs:
            n = ipaddress.ip_network(str(c), strict=False)
            nets = [n]
            if n.version == 4:
                nets.append(_nat64(n))
            for x in nets:
                if x not in best or _RANK[scope] > _RANK[best[x]]:
                    best[x] = scope
    return [(str(n), s) for n, s in sorted(best.items(), key=lambda kv: (kv[0].version, kv[0]))]


class Scoper:
    """Userspace side of the table: longest prefix over `scope_rows`, as the kernel's trie."""

    def __init__(self, internal: Sequence[str] = (), metadata: Sequence[str] = DEFAULT_METADATA,
                 replace_internal: bool = False):
        nets = list(internal) if replace_internal else list(DEFAULT_INTERNAL) + list(internal)
        self.rows = scope_rows(nets, metadata)
        self._by_len = {4: [], 6: []}
        for cidr, scope in self.rows:
            n = ipaddress.ip_network(cidr)
            self._by_len[n.version].append((n, scope))
        for v in self._by_len.values():
            v.sort(key=lambda ns: -ns[0].prefixlen)
        self.internal = [n for n, s in self._by_len[4] + self._by_len[6] if s == "internal"]
        self.metadata = [n for n, s in self._by_len[4] + self._by_len[6] if s == "metadata"]
        self.scope = lru_cache(maxsize=8192)(self._scope)

    def _scope(self, addr: str) -> str:
        ip = ipaddress.ip_address(addr)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if ip.is_unspecified:
            return "loopback"   # connect(0.0.0.0) / connect(::) reaches this host
        for n, scope in self._by_len[ip.version]:
            if ip in n:
                return scope
        return "external"


def parse_cidr(text: str, where: str = "--internal") -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as e:
        raise ValueError(f"{where}: '{text}' is not a CIDR ({e})") from None
