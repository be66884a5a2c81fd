"""Compiling rules and per-group egress policies into the tables the kernel maps hold."""
from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from agenttrace.clock import FakeClock
from agenttrace.match.engine import Engine
from agenttrace.session.event import Event
from agenttrace.match.policy import (EXEC_MATCH_BASENAME, PROTOCOL_NUM, SCOPE_EXTERNAL, SCOPE_METADATA,
                               EgressPolicy, compile_policy)
from agenttrace.match.rules import default_rule_paths, lint, load_rules


def test_default_pack_policy_tables():
    rs = load_rules(default_rule_paths())
    kp = compile_policy(rs)
    by_rule = {}
    for e in kp.dest_deny:
        by_rule.setdefault(kp.policy_ids[e.policy_id], []).append(e)
    (meta,) = by_rule["egress-metadata-address"]
    assert meta.scope_mask == SCOPE_METADATA and (meta.port_lo, meta.port_hi) == (0, 65535) and meta.proto == 0
    (ssh,) = by_rule["tunnel-ssh-external-port"]
    assert (ssh.scope_mask, ssh.port_lo, ssh.port_hi, ssh.proto) == (SCOPE_EXTERNAL, 22, 22, 6)
    pool_ports = {e.port_lo for e in by_rule["mining-pool-port"]}
    assert pool_ports == set(rs.lists["stratum_ports"]) and 8080 not in pool_ports
    kills = {(kp.policy_ids[k.policy_id], k.value) for k in kp.exec_kill}
    assert ("mining-binary-exec", b"xmrig") in kills and ("tunnel-tool-exec", b"chisel") in kills
    assert all(k.match == EXEC_MATCH_BASENAME for k in kp.exec_kill)
    drops = {(kp.policy_ids[d.policy_id], d.protocol) for d in kp.protocol_drop}
    assert drops == {("tunnel-ssh-external-flow", PROTOCOL_NUM["ssh"]), ("mining-stratum-flow", PROTOCOL_NUM["stratum"])}
    # userspace-only rules never reach the kernel
    assert not {"tunnel-ssh-forwarding", "mining-pool-domain", "scan-internal-ports"} & set(kp.policy_ids.values())
    # scope table: metadata /32 inside the internal link-local /16 (longest prefix wins)
    meta_addrs = {ipaddress.ip_address(s.addr) for s in kp.scopes if s.scope == SCOPE_METADATA}
    assert ipaddress.ip_address("169.254.169.254") in meta_addrs


def test_egress_allow_list_and_deny_per_group():
    egress = {
        "rl-train": EgressPolicy(mode="allow-list", action="block",
                                 allow=[{"cidr": "203.0.113.0/28", "ports": [443]},
                                        {"cidr": "2001:db8::/32", "proto": "tcp"}],
                                 deny=[{"cidr": "198.51.100.7/32", "ports": ["8000-8100"], "proto": "tcp"}]),
        "eval": {"mode": "allow-list", "allow": [{"cidr": "192.0.2.0/24"}]},     # report only
    }
    rs = load_rules(default_rule_paths(), egress=egress)
    kp = compile_policy(rs)
    g = {gp.name: gp for gp in kp.groups}
    assert g["rl-train"].allow_list and g["rl-train"].allow_scope_mask == SCOPE_EXTERNAL
    assert not g["eval"].allow_list                  # report-only policies stay in userspace
    allow = [(a.family, ipaddress.ip_address(a.addr), a.prefixlen, a.port_lo, a.proto) for a in kp.dest_allow]
    assert allow == [(4, ipaddress.ip_address("203.0.113.0"), 28, 443, 0),
                     (6, ipaddress.ip_address("2001:db8::"), 32, 0, 6)]
    deny = [e for e in kp.dest_deny if kp.policy_ids[e.policy_id].startswith("egress-policy.rl-train.deny")]
    assert [(e.group_id, e.port_lo, e.port_hi, e.proto) for e in deny] == [(g["rl-train"].group_id, 8000, 8100, 6)]

    eng = Engine(rs, clock=FakeClock())

    def fired(group, addr, port):
        rec = {"ts": "2025-11-27T08:00:00Z", "kind": "connect", "agent": {"id": f"x-{addr}-{port}", "group": group},
               "proc": {"pid": 1, "comm": "python3", "exe": "/usr/bin/python3", "args": []},
               "net": {"proto": "tcp", "dst": {"addr": addr, "port": port, "scope": "external"}, "verdict": "allowed"}}
        return {a.record["rule"]["id"] for a in eng.process(Event.from_record(rec))}

    assert "egress-policy.rl-train.allow-list" not in fired("rl-train", "203.0.113.5", 443)
    assert "egress-policy.rl-train.allow-list" in fired("rl-train", "203.0.113.5", 80)
    assert "egress-policy.rl-train.allow-list" in fired("rl-train", "203.0.113.200", 443)
    assert "egress-policy.rl-train.deny.0" in fired("rl-train", "198.51.100.7", 8050)
    assert "egress-policy.eval.allow-list" in fired("eval", "203.0.113.5", 443)
    assert not any(r.startswith("egress-policy") for r in fired("other", "203.0.113.5", 80))


def test_bad_egress_policy_is_a_validation_error():
    with pytest.raises(ValidationError) as ei:
        EgressPolicy.model_validate({"mode": "allowlist", "allow": [{"cidr": "300.1.1.1/8"}]})
    locs = {e["loc"] for e in ei.value.errors()}
    assert ("mode",) in locs and ("allow", 0, "cidr") in locs
    with pytest.raises(ValidationError):
        EgressPolicy.model_validate({"deny": [{"cidr": "10.0.0.0/8", "ports": ["90-80"]}]})
    with pytest.raises(ValidationError):
        EgressPolicy.model_validate({"deny": [{"cidr": "10.0.0.0/8", "port": 80}]})


def test_kernel_kill_only_for_exact_names(tmp_path):
    f = tmp_path / "k.yaml"
    f.write_text("""\
lists:
  wild: ["xm*"]
rules:
  - id: exact
    description: an exec kill the kernel can hold by name
    category: mining
    severity: high
    on: [exec]
    match: {exe: {paths: [/opt/bad/tool], basenames: [badtool]}}
    action: kill
  - id: wild-via-list
    description: wildcards spliced from a list stay in userspace
    category: mining
    severity: high
    on: [exec]
    match: {exe: {basenames: ["$wild"]}}
    action: kill
  - id: with-args
    description: args need the command line, so userspace
    category: mining
    severity: high
    on: [exec]
    match: {exe: {basenames: [badtool], args_contain: ["--go"]}}
    action: kill
""")
    rs = load_rules([f])
    assert {r.id: r.enforced_in for r in rs.rules} == {"exact": "kernel", "wild-via-list": "userspace",
                                                        "with-args": "userspace"}
    kp = compile_policy(rs)
    assert sorted((k.match, k.value) for k in kp.exec_kill) == [(1, b"/opt/bad/tool"), (2, b"badtool")]


def test_block_on_device_majors_and_unholdable_protocol(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("""\
lists:
  protos: [tls]
rules:
  - id: no-nvidia
    description: deny the NVIDIA character devices to this agent group
    category: gpu
    severity: high
    on: [device]
    match: {groups: [cpu-only], device: {majors: [195]}}
    action: block
  - id: no-tls
    description: the kernel classifier knows ssh and stratum only
    category: egress
    severity: high
    on: [flow]
    match: {protocols: ["$protos"]}
    action: block
""")
    errs = sorted(lint([f]), key=lambda e: e.line)
    # a device block has no map to live in (cgroup/dev holds the GPU fence only): refused at
    # lint, never accepted and silently left unenforced
    assert [e.rule_id for e in errs] == ["no-nvidia", "no-tls"]
    assert "gpu" in errs[0].message and errs[0].line == 8
    assert "tls" in errs[1].message and errs[1].line == 16
