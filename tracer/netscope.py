"""Destination scope: loopback, internal, metadata or external (DESIGN §5)."""
from __future__ import annotations

import ipaddress
from functools import lru_cache

DEFAULT_INTERNAL = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                    "169.254.0.0/16", "fc00::/7", "fe80::/10")
# Cloud instance-metadata endpoints: AWS/GCP/Azure/OpenStack, AWS IPv6, AWS ECS task
# metadata, Alibaba. They hand out credentials, so they get their own scope.
DEFAULT_METADATA = ("169.254.169.254/32", "fd00:ec2::254/128", "169.254.170.2/32",
                    "100.100.100.200/32")


class Scoper:
    def __init__(self, internal=(), metadata=DEFAULT_METADATA, replace_internal: bool = False):
        nets = list(internal) if replace_internal else list(DEFAULT_INTERNAL) + list(internal)
        self.internal = [ipaddress.ip_network(n, strict=False) for n in nets]
        self.metadata = [ipaddress.ip_network(n, strict=False) for n in metadata]
        self.scope = lru_cache(maxsize=8192)(self._scope)

    def _scope(self, addr: str) -> str:
        ip = ipaddress.ip_address(addr)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if ip.is_loopback or ip.is_unspecified:
            return "loopback"
        for n in self.metadata:
            if ip.version == n.version and ip in n:
                return "metadata"
        for n in self.internal:
            if ip.version == n.version and ip in n:
                return "internal"
        return "external"


def parse_cidr(text: str, where: str = "--internal") -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as e:
        raise ValueError(f"{where}: '{text}' is not a CIDR ({e})") from None
