"""The machine-readable JSON Schema of the the record contract (tracer/schema/event.schema.json) contract: it accepts a sample of every
kind and rejects malformed records."""
from __future__ import annotations

import copy
import json

import pytest
from jsonschema import Draft202012Validator

from agenttrace.paths import schema_dir

SCHEMA = json.loads((schema_dir() / "event.schema.json").read_text())
V = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)

TS = "2026-11-27T07:00:00.123456789Z"
AGENT = {"id": "a1", "cgroup": "/agents/a1", "cgroup_id": 4242, "team": "rl"}
PROC = {"pid": 321, "ppid": 300, "uid": 1000, "comm": "ssh", "exe": "/usr/bin/ssh",
        "args": ["ssh", "-R", "2222:localhost:22", "u@203.0.113.7"],
        "ancestry": [{"pid": 300, "comm": "python3", "exe": "/usr/bin/python3.11"}]}
NET = {"proto": "tcp", "family": "ipv4", "src": {"addr": "10.0.0.5", "port": 40000},
       "dst": {"addr": "203.0.113.7", "port": 22, "scope": "external", "name": None},
       "verdict": "blocked", "result": "blocked"}


def r(kind, **body):
    out = {"ts": TS, "kind": kind, "node": "gpu-node-1", "agent": copy.deepcopy(AGENT)}
    out.update(copy.deepcopy(body))
    return out


SAMPLES = {
    "exec": r("exec", proc=PROC),
    "fork": r("fork", proc=PROC),
    "exit": r("exit", proc=PROC, exit_code=0, duration_ms=12.5),
    "connect": r("connect", proc=PROC, net=NET),
    "connect6": r("connect", proc=PROC, net=dict(NET, family="ipv6", src={"addr": "::1", "port": 5},
                                                 dst={"addr": "2001:db8::1", "port": 443, "scope": "external",
                                                      "name": "example.org"})),
    "listen": r("listen", proc=PROC, net={"proto": "tcp", "family": "ipv4", "local": {"addr": "0.0.0.0", "port": 8080}}),
    "dns": r("dns", proc=PROC, dns={"query": "pool.example", "qtype": "A", "server": {"addr": "10.0.0.53", "port": 53},
                                    "answers": ["198.51.100.9"]}),
    "flow": r("flow", proc=PROC, net=NET, flow={"protocol": "ssh", "detail": {"banner": "SSH-2.0-OpenSSH_9.2"}}),
    "gpu": r("gpu", proc=PROC, gpu={"index": 0, "uuid": "GPU-0", "name": "H100", "used_memory_mib": 1024,
                                    "sm_util_pct": 97}),
    "device": r("device", proc=PROC, device={"major": 195, "minor": 0, "access": ["read", "write"],
                                             "verdict": "blocked"}),
    "socket": r("socket", proc=PROC, socket={"family": "inet", "type": "raw", "protocol": "icmp",
                                             "verdict": "blocked", "fenced": True}),
    "socket packet killed": r("socket", proc=PROC, socket={"family": "packet", "type": "raw", "protocol": "768",
                                                           "verdict": "killed", "fenced": True, "hook": "sys_socket"}),
    "socket refused before sock_create": r("socket", proc=PROC, socket={
        "family": "inet", "type": "raw", "protocol": "icmp", "verdict": "blocked", "fenced": True,
        "hook": "sys_socket", "error": "EPERM"}),
    "escape": r("escape", proc=PROC, escape={"pid": 4242, "by_pid": 4242, "self": True, "how": "cgroup_procs",
                                             "to": {"cgroup": "/user.slice", "cgroup_id": 9}, "verdict": "killed"}),
    "file": r("file", proc=PROC, file={"path": "/home/dev/.ssh/authorized_keys", "raw_path": "authorized_keys",
                                       "op": "write", "syscall": "openat", "flags": ["O_WRONLY", "O_CREAT", "O_APPEND"],
                                       "class": "authorized_keys", "verdict": "killed", "kill_effect": "no_io",
                                       "policy_id": 3}),
    "alert": r("alert", proc=PROC, net=NET, trigger="connect",
               rule={"id": "tunnel.reverse_ssh", "category": "tunnel", "severity": "critical", "action": "block",
                     "outcome": "blocked", "tags": ["T1572"], "message": "reverse SSH tunnel"}),
    "summary": r("summary", schema_version="1.1", summary={
        "reason": "cgroup_removed", "first_ts": TS, "last_ts": TS, "duration_s": 0.0, "records": 3,
        "records_by_kind": {"exec": 2, "alert": 1}, "processes": {"execs": 2, "forks": 0, "distinct_pids": 2},
        "root": {"pid": 321, "exec_id": "b00t-321-5", "exe": "/bin/sh", "args": ["sh"], "exit_code": 3, "signal": None},
        "alerts": 1, "alerts_by_rule": {"egress-metadata-address": {"blocked": 1}},
        "connects_by_proto": {"tcp/blocked": 1}, "flows_by_protocol": {},
        "destinations": {"distinct": 1, "other": 0, "top": [{"addr": "169.254.169.254", "port": 80, "scope": "metadata",
                                                              "name": None, "count": 1}]},
        "dns_names": {"distinct": 0, "other": 0, "top": []},
        "gpu": [{"index": 0, "uuid": "GPU-0", "name": "H100", "peak_memory_mib": 6144, "seconds": 1.5}]}),
    "exec_ids": r("exec", schema_version="1.1", proc=dict(PROC, exec_id="b00t-321-5", parent_exec_id=None),
                  agent=dict(AGENT, episode="ep-7", container={"runtime": "containerd", "id": "a" * 64},
                             pod={"uid": "1234abcd-5678-90ab-cdef-1234567890ab", "qos": "burstable"})),
    "lifecycle": {"ts": TS, "kind": "lifecycle", "node": "gpu-node-1", "agent": None, "phase": "stats",
                  "events": 10, "alerts": 1,
                  "drops": {"kernel": 3, "kernel_by_agent": {"a1": 3}, "sinks": {"stdout": 0}},
                  "counters": {"events": 10, "alerts": 1, "drops": 3}},
}


def errors(rec):
    return list(V.iter_errors(rec))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_valid_sample_of_every_kind(name):
    assert errors(SAMPLES[name]) == []


def test_every_design_kind_is_covered():
    kinds = set(SCHEMA["properties"]["kind"]["enum"])
    assert {"exec", "exit", "connect", "listen", "dns", "flow", "gpu", "device", "alert", "lifecycle"} <= kinds
    assert kinds == {s["kind"] for s in SAMPLES.values()}


def test_records_built_by_the_device_decoder_fit():
    from agenttrace.gpu.service import device_body
    assert errors(r("device", proc=PROC, device=device_body(195, 0, 6, 2, 1))) == []


def mutate(name, fn):
    rec = copy.deepcopy(SAMPLES[name])
    fn(rec)
    return rec


BAD = {
    "no ts": ("exec", lambda x: x.pop("ts")),
    "ts without zone": ("exec", lambda x: x.update(ts="2026-11-27T07:00:00.1")),
    "ts as number": ("exec", lambda x: x.update(ts=1700000000)),
    "unknown kind": ("exec", lambda x: x.update(kind="execve")),
    "no node": ("exec", lambda x: x.pop("node")),
    "exec without proc": ("exec", lambda x: x.pop("proc")),
    "file with an unknown class": ("file", lambda x: x["file"].update({"class": "secret"})),
    "file without op": ("file", lambda x: x["file"].pop("op")),
    "exec without agent": ("exec", lambda x: x.update(agent=None)),
    "agent without cgroup_id": ("exec", lambda x: x["agent"].pop("cgroup_id")),
    "agent cgroup not rooted": ("exec", lambda x: x["agent"].update(cgroup="agents/a1")),
    "label that is an object": ("exec", lambda x: x["agent"].update(team={"a": 1})),
    "args not a list": ("exec", lambda x: x["proc"].update(args="ssh -R")),
    "pid negative": ("exec", lambda x: x["proc"].update(pid=-1)),
    "ancestor without exe": ("exec", lambda x: x["proc"]["ancestry"][0].pop("exe")),
    "exit without code": ("exit", lambda x: x.pop("exit_code")),
    "connect without verdict": ("connect", lambda x: x["net"].pop("verdict")),
    "bad verdict": ("connect", lambda x: x["net"].update(verdict="denied")),
    "bad result": ("connect", lambda x: x["net"].update(result="ok")),
    "bad scope": ("connect", lambda x: x["net"]["dst"].update(scope="public")),
    "connect dst without scope": ("connect", lambda x: x["net"]["dst"].pop("scope")),
    "port out of range": ("connect", lambda x: x["net"]["dst"].update(port=70000)),
    "address not an IP": ("connect", lambda x: x["net"]["dst"].update(addr="evil.example")),
    "bad family": ("connect", lambda x: x["net"].update(family="inet")),
    "listen without local": ("listen", lambda x: x["net"].pop("local")),
    "dns without query": ("dns", lambda x: x["dns"].pop("query")),
    "flow bad protocol": ("flow", lambda x: x["flow"].update(protocol="ftp")),
    "gpu util over 100": ("gpu", lambda x: x["gpu"].update(sm_util_pct=101)),
    "device bad verdict": ("device", lambda x: x["device"].update(verdict="maybe")),
    "device bad access": ("device", lambda x: x["device"].update(access=["exec"])),
    "alert without rule": ("alert", lambda x: x.pop("rule")),
    "alert bad severity": ("alert", lambda x: x["rule"].update(severity="urgent")),
    "alert bad category": ("alert", lambda x: x["rule"].update(category="malware")),
    "alert bad outcome": ("alert", lambda x: x["rule"].update(outcome="ignored")),
    "alert bad action": ("alert", lambda x: x["rule"].update(action="nuke")),
    "alert without message": ("alert", lambda x: x["rule"].pop("message")),
    "summary without counts": ("summary", lambda x: x["summary"].pop("records_by_kind")),
    "summary bad reason": ("summary", lambda x: x["summary"].update(reason="bored")),
    "container bad runtime": ("exec_ids", lambda x: x["agent"]["container"].update(runtime="lxc")),
    "schema_version not a version": ("exec_ids", lambda x: x.update(schema_version=1)),
    "lifecycle bad phase": ("lifecycle", lambda x: x.update(phase="paused")),
    "lifecycle negative drops": ("lifecycle", lambda x: x["drops"].update(kernel=-1)),
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_malformed_records_are_rejected(what):
    name, fn = BAD[what]
    assert errors(mutate(name, fn)), f"schema accepted: {what}"
