"""The per-agent `summary`: after a scripted episode (exec tree, connects, a blocked metadata
access in the netlab, GPU use through the fake NVML) and the removal of its cgroup, exactly
one summary whose counts equal what the records of that agent say."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time

from harness import own_gpu_burner
from netlab import WEB_HOST


EPISODE = """
set -u
/bin/sh -c '/bin/true; /bin/sh -c "/bin/echo nested >/dev/null"'
{py} -c "import socket; s=socket.create_connection(('{web}', 80), timeout=5); s.sendall(b'GET / HTTP/1.0\\r\\nHost: www.example.org\\r\\n\\r\\n'); s.recv(100); s.close()"
{py} -c "import socket; socket.getaddrinfo('www.example.org', 80)"
{py} -c "import socket, errno; assert socket.socket().connect_ex(('169.254.169.254', 80)) == errno.EPERM"
{burner} 30 &
b=$!
while [ ! -e {ready} ]; do /bin/sleep 0.05; done
kill $b; wait $b
exit 3
"""


def _engine():
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    return Engine(load_rules(list(default_rule_paths())), mode="enforce")


def test_summary_matches_records_after_removal(netlab, agent_tree, make_session, tmp_path):
    from agenttrace.gpu.service import GpuConfig, GpuGroupPolicy
    from agenttrace.gpu.fake import FakeBackend
    a = agent_tree.agent("episode")
    os.setxattr(a, "user.agenttrace.episode", b"ep-7")
    fixture, burner = own_gpu_burner(tmp_path)      # a comm of its own: no other test's burner
    ready = tmp_path / "gpu-seen"
    script = EPISODE.format(py=sys.executable, web=WEB_HOST, burner=burner, ready=ready)
    gpu = GpuConfig(interval_s=0.1, default=GpuGroupPolicy(allowed=True), fence="off")
    sess = make_session([agent_tree.root], engine=_engine(), mode="enforce",
                        gpu=gpu, gpu_backend=FakeBackend(fixture))
    p = netlab.run_in_agent(["/bin/sh", "-c", script], cgroup=a, stdout=subprocess.DEVNULL)
    # the burner is released once the sampler saw it hold the GPU
    try:
        assert sess.wait_for(lambda: any(r["kind"] == "gpu" and r["gpu"]["change"] == "acquired" for r in sess.records), 60)
    finally:
        ready.touch()
    while p.poll() is None:
        sess.tracer.poll(50)
    assert p.returncode == 3
    assert sess.wait_for(lambda: any(r["kind"] == "gpu" and r["gpu"]["change"] == "released" for r in sess.records), 60)
    assert all((r["agent"] or {}).get("id") == "episode" for r in sess.records if r["kind"] == "gpu"), \
        [(r["agent"], r["gpu"]["change"]) for r in sess.records if r["kind"] == "gpu"]
    cid = os.stat(a).st_ino
    os.rmdir(a)
    got = sess.wait_for(lambda: [r for r in sess.records if r["kind"] == "summary"], 30)
    time.sleep(1.2)
    sess.settle()                           # a second tick: still exactly one summary
    sums = [r for r in sess.records if r["kind"] == "summary"]
    assert len(sums) == 1 and got
    s = sums[0]
    assert s["agent"]["cgroup_id"] == cid and s["agent"]["episode"] == "ep-7"
    assert s["schema_version"]
    body = s["summary"]
    mine = [r for r in sess.records if (r.get("agent") or {}).get("cgroup_id") == cid and r["kind"] != "summary"]
    at = next(i for i, r in enumerate(sess.records) if r is s)
    late = [r for r in sess.records[at + 1:] if r in mine]
    assert not late, [(r["kind"], r.get("rule")) for r in late]    # it comes last
    kinds = collections.Counter(r["kind"] for r in mine)
    assert body["reason"] == "cgroup_removed"
    assert body["records"] == len(mine) and body["records_by_kind"] == dict(kinds)
    assert body["first_ts"] == min(r["ts"] for r in mine) and body["last_ts"] == max(r["ts"] for r in mine)
    # fork records stay in the kernel by default (docs/MIGRATION.md): the forks are the kernel's
    # count, the figure the fork records would have given
    kf = sess.tracer.kernel_forks.counts(cid)
    assert kinds["fork"] == 0 and kf["forks"] == kf["forks_quiet"] >= kinds["exec"] - 1
    assert body["processes"] == {"execs": kinds["exec"], "forks": kinds["fork"] + kf["forks_quiet"],
                                 "distinct_pids": len({r["proc"]["pid"] for r in mine if r["kind"] in ("exec", "fork")})}
    assert kinds["exec"] >= 7
    assert body["root"]["exe"] == "/bin/sh" and body["root"]["exit_code"] == 3
    alerts = collections.defaultdict(collections.Counter)
    for r in mine:
        if r["kind"] == "alert":
            alerts[r["rule"]["id"]][r["rule"]["outcome"]] += 1
    assert body["alerts_by_rule"] == {k: dict(v) for k, v in alerts.items()}
    assert body["alerts_by_rule"]["egress-metadata-address"] == {"blocked": 1}
    assert body["alerts"] == kinds["alert"]
    dests = collections.Counter((r["net"]["dst"]["addr"], r["net"]["dst"]["port"]) for r in mine
                                if r["kind"] in ("connect", "flow") and r["net"]["dst"]["scope"] != "loopback")
    assert {(d["addr"], d["port"]): d["count"] for d in body["destinations"]["top"]} == dict(dests)
    assert (WEB_HOST, 80) in dests and ("169.254.169.254", 80) in dests
    names = collections.Counter(r["dns"]["query"] for r in mine if r["kind"] == "dns")
    assert {d["name"]: d["count"] for d in body["dns_names"]["top"]} == dict(names)
    assert "www.example.org" in names
    connects = collections.Counter(f'{r["net"]["proto"]}/{r["net"]["verdict"]}' for r in mine if r["kind"] == "connect")
    assert body["connects_by_proto"] == dict(connects)
    flows = collections.Counter(r["flow"]["protocol"] for r in mine if r["kind"] == "flow")
    assert body["flows_by_protocol"] == dict(flows) and flows["http"] >= 1
    (g,) = body["gpu"]
    assert g["index"] == 0 and g["peak_memory_mib"] == 6144 and g["seconds"] > 0
    acq = [r for r in mine if r["kind"] == "gpu" and r["gpu"]["change"] == "acquired"]
    rel = [r for r in mine if r["kind"] == "gpu" and r["gpu"]["change"] == "released"]
    from agenttrace.timefmt import parse_ns
    assert abs(g["seconds"] - (parse_ns(rel[0]["ts"]) - parse_ns(acq[0]["ts"])) / 1e9) < 0.002
    # every record of the episode, the summary too, fits the published schema
    from jsonschema import Draft202012Validator
    from agenttrace.paths import schema_dir
    v = Draft202012Validator(json.loads((schema_dir() / "event.schema.json").read_text()),
                             format_checker=Draft202012Validator.FORMAT_CHECKER)
    bad = [(r["kind"], e.message) for r in sess.records for e in v.iter_errors(r)]
    assert bad == []


def test_run_cmd_ends_with_summary_and_labels_via_cli(tmp_path, require_bpf):
    """`agenttrace run --label ... -- CMD`: labels on every agent record, one summary at the
    end naming the command's exit status; a bad label is refused with exit 2."""
    from conftest import AGENTTRACE
    out = tmp_path / "ev.jsonl"
    r = subprocess.run([AGENTTRACE, "run", "--no-rules", "--no-net", "--label", "episode=ep-7", "-l", "run_id=r1",
                        "-o", str(out), "--", "/bin/sh", "-c", "/bin/true; exit 5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 5, r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(x["schema_version"] == recs[0]["schema_version"] for x in recs)
    agent_recs = [x for x in recs if x.get("agent")]
    assert agent_recs and all(x["agent"]["episode"] == "ep-7" and x["agent"]["run_id"] == "r1" for x in agent_recs)
    (s,) = [x for x in recs if x["kind"] == "summary"]
    assert s["summary"]["reason"] == "command_exited" and s["summary"]["root"]["exit_code"] == 5
    assert s["summary"]["records"] == len(agent_recs) - 1
    assert s["summary"]["records_by_kind"] == dict(collections.Counter(x["kind"] for x in agent_recs if x is not s))
    bad = subprocess.run([AGENTTRACE, "run", "--label", "episode=\x1b[2J", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--label" in bad.stderr and "\x1b" not in bad.stderr


def test_summary_in_ocsf():
    from agenttrace.sinks.ocsf import to_ocsf
    rec = {"ts": "2026-12-01T10:00:02Z", "kind": "summary", "node": "n",
           "agent": {"id": "ep", "cgroup": "/a/ep", "cgroup_id": 9, "episode": "ep-7"},
           "summary": {"reason": "cgroup_removed", "first_ts": "2026-12-01T10:00:00Z", "last_ts": "2026-12-01T10:00:01.5Z",
                       "records": 12, "alerts": 1}}
    ev = to_ocsf(rec)
    assert ev["class_uid"] == 0 and ev["count"] == 12 and ev["duration"] == 1500
    assert ev["unmapped"]["summary"]["alerts"] == 1 and ev["unmapped"]["agent"]["episode"] == "ep-7"
    assert "ep: 12 records, 1 alerts" in ev["message"]
