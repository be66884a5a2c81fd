"""The kernel's TLS server-name check (probes/tls.c) as a `flow` record.

A `struct at_sni` says a ClientHello named a host a `block` rule forbids: in enforce mode the
segment was dropped (and the flow with it, so flow.c sent no record of that way); in monitor
mode it comes only when the name lay past flow.c's capture. Either way it is the egress `flow`
record of that connection, so the rules on TLS server names match it like any other: protocol
`tls`, `detail.sni`, and `capture: ["sni_check"]` saying where it came from.
"""
from __future__ import annotations

from agenttrace.decode.protocols import EGRESS, TLS

MATCH_NAMES = {1: "exact", 2: "subdomains"}     # AT_SNI_MATCH_* in probes/agenttrace.h


def sni_parts(rec) -> tuple[dict, dict]:
    """`net` and `flow` parts from one kernel `struct at_sni` (agenttrace.kernel.wire.Sni);
    scope and name are left for the enrich stage, as for flow records."""
    from agenttrace.kernel.wire import SNI_MAX, addr_str

    fam = "ipv6" if rec.family == 10 else "ipv4"
    n = min(int(rec.name_len), SNI_MAX)
    name = bytes(rec.name)[:n].decode("ascii", errors="backslashreplace")
    net = {"proto": "tcp", "family": fam,
           "src": {"addr": addr_str(rec.saddr, rec.family), "port": int(rec.sport)},
           "dst": {"addr": addr_str(rec.daddr, rec.family), "port": int(rec.dport)},
           "verdict": "blocked" if rec.verdict == 1 else "allowed"}
    if rec.policy_id:
        net["policy_id"] = int(rec.policy_id)
    detail = {"role": "client", "handshake": "client_hello", "sni": name,
              "sni_match": MATCH_NAMES.get(int(rec.match), "unknown"), "sni_offset": int(rec.name_off)}
    flow = {"protocol": TLS, "detail": detail, "direction": EGRESS, "bytes": 0, "kernel_hint": TLS,
            "padding": 0, "segments": 1, "capture": ["sni_check"]}
    return net, flow
