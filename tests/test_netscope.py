"""One scope table for the kernel and userspace: every cloud metadata endpoint, IPv6 ULA and
link-local, NAT64, and the same answer from the kernel's LPM trie as from Scoper."""
from __future__ import annotations

import ctypes as C
import ipaddress
import socket

import pytest

from conftest import need_bpf
from agenttrace.enrich.scope import DEFAULT_METADATA, METADATA_NAMES, Scoper, scope_rows
from agenttrace.match.rules import default_rule_paths, load_rules

CASES = [
    ("169.254.169.254", "metadata"),       # AWS/GCP/Azure/OCI/OpenStack IMDS
    ("fd00:ec2::254", "metadata"),         # AWS IMDS IPv6
    ("169.254.170.2", "metadata"),         # ECS task credentials
    ("169.254.170.23", "metadata"),        # EKS Pod Identity
    ("fd00:ec2::23", "metadata"),
    ("fd20:ce::254", "metadata"),          # GCP IPv6
    ("168.63.129.16", "metadata"),         # Azure WireServer: public address, metadata scope
    ("100.100.100.200", "metadata"),       # Alibaba
    ("fd00:c1::a9fe:a9fe", "metadata"),    # Oracle IPv6
    ("fe80::a9fe:a9fe", "metadata"),       # OpenStack IPv6
    ("64:ff9b::a9fe:a9fe", "metadata"),    # 169.254.169.254 through NAT64
    ("64:ff9b::a4d:1", "internal"),        # 10.77.0.1 through NAT64
    ("64:ff9b::cb00:710a", "external"),    # 203.0.113.10 through NAT64
    ("64:ff9b:1::1", "internal"),          # local-use NAT64 prefix
    ("64:ff9b::7f00:1", "loopback"),
    ("fd12:3456::1", "internal"), ("fe80::1", "internal"), ("169.254.10.1", "internal"),
    ("100.64.1.1", "internal"), ("::ffff:168.63.129.16", "metadata"),
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "loopback"),
    ("168.63.129.17", "external"), ("8.8.8.8", "external"), ("2001:db8::1", "external"),
]


@pytest.mark.parametrize("addr,scope", CASES)
def test_scope_of(addr, scope):
    assert Scoper().scope(addr) == scope


def test_rows_are_unique_and_metadata_wins_a_tie():
    rows = scope_rows(["169.254.169.254/32", "10.0.0.0/8"], DEFAULT_METADATA)
    assert len({c for c, _ in rows}) == len(rows)
    assert dict(rows)["169.254.169.254/32"] == "metadata"
    assert Scoper(internal=["168.63.129.16/32"]).scope("168.63.129.16") == "metadata"
    assert Scoper(internal=["203.0.113.0/24"]).scope("64:ff9b::cb00:7101") == "internal"


def test_pack_metadata_names_hold_the_table_names():
    rs = load_rules(default_rule_paths())
    assert set(METADATA_NAMES) <= set(rs.lists["metadata_names"])


def test_kernel_trie_answers_like_userspace(agent_tree):
    """Fill the kernel's `scopes` trie with the policy writer and look every case up in it."""
    need_bpf()
    from agenttrace.kernel import loader as P
    from agenttrace.kernel.maps import PolicyWriter
    from agenttrace.enrich.scope import DEFAULT_INTERNAL
    from agenttrace.match.policy import SCOPE_BITS, compile_policy
    rs = load_rules(default_rule_paths())
    p = P.Probes(features=("net",), ringbuf_pages=64)
    p.load()
    try:
        PolicyWriter(p).apply(compile_policy(rs, internal=list(DEFAULT_INTERNAL)))
        t = p["scopes"]
        names = {v: k for k, v in SCOPE_BITS.items()}
        for addr, want in CASES:
            if addr in ("0.0.0.0",):
                continue  # the unspecified address is decided in code, not in the table
            ip = ipaddress.ip_address(addr)
            raw = (b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip.packed
            if ip.version == 6 and ip.ipv4_mapped:
                raw = ip.packed
            k = t.Key()
            k.prefixlen = 128
            C.memmove(C.addressof(k) + 4, raw, 16)
            try:
                got = names[t[k].value]
            except KeyError:
                got = "external"
            assert got == want == Scoper().scope(addr), addr
    finally:
        p.close()
