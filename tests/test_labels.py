"""Agent labels from cgroup xattrs (set before and changed during a run), their bounds, and
container/pod identity from cgroup names as the runtimes make them."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest

from agenttrace.enrich.containers import identity
from agenttrace.enrich.labels import LabelError, MAX_VALUE_BYTES, check_value, parse_kv

X = "user.agenttrace."
CID = "4f3a" * 16
POD = "1234abcd-5678-90ab-cdef-1234567890ab"


def _execs(sess, marker):
    return [r for r in sess.of("exec") if marker in r["proc"]["args"]]


def test_xattr_labels_before_and_changed_during_run(agent_tree, make_session):
    a1 = agent_tree.agent("a1")
    os.setxattr(a1, X + "episode", b"ep-7")
    os.setxattr(a1, X + "run_id", b"r1")
    os.setxattr(a1, X + "evil", b"ok\x1b[31m\nfake")              # control characters
    os.setxattr(a1, X + "big", b"v" * (MAX_VALUE_BYTES + 1))     # over the bound
    sess = make_session([agent_tree.root])
    sess.tracer.agents.label_refresh_ns = 100_000_000
    agent_tree.run(a1, ["/bin/sh", "-c", "/bin/true before-change"])
    assert sess.wait_for(lambda: _execs(sess, "before-change"))

    os.setxattr(a1, X + "episode", b"ep-8")
    os.setxattr(a1, X + "run_id", b"r2")
    time.sleep(0.3)        # past the refresh interval: what follows must carry the new values
    agent_tree.run(a1, ["/bin/sh", "-c", "/bin/true after-change; /bin/true after-change-2"])
    assert sess.wait_for(lambda: len(_execs(sess, "after-change-2")) >= 1)
    sess.settle()

    before = [r for r in sess.records if r.get("agent") and r["agent"]["id"] == "a1"
              and "before-change" in (r.get("proc") or {}).get("args", [])]
    after_start = min(r["ts"] for r in sess.records if "after-change" in (r.get("proc") or {}).get("args", []))
    later = [r for r in sess.records if r.get("agent") and r["agent"]["id"] == "a1" and r["ts"] >= after_start]
    assert before and later
    for r in before:
        assert (r["agent"]["episode"], r["agent"]["run_id"]) == ("ep-7", "r1")
    for r in later:
        assert (r["agent"]["episode"], r["agent"]["run_id"]) == ("ep-8", "r2"), (r["kind"], r["ts"], r["proc"], after_start)
    # rejected values: counted, a notice naming the key and reason, never the value
    assert sess.tracer.agents.labels_rejected == 2          # once each, however often re-read
    assert sess.tracer.counters()["labels_rejected"] == 2
    notices = sess.of("lifecycle", phase="notice", code="label_rejected")
    assert len(notices) == 2
    text = " ".join(n["message"] for n in notices)
    assert "evil" in text and "control" in text and "big" in text and "bound" in text
    blob = json.dumps(sess.records)
    assert "fake" not in blob and "\\u001b" not in blob and "v" * (MAX_VALUE_BYTES + 1) not in blob
    for r in sess.records:
        if r.get("agent"):
            assert "evil" not in r["agent"] and "big" not in r["agent"]


def test_label_bounds():
    assert parse_kv("episode=ep-7") == ("episode", "ep-7")
    for bad in ("noequals", "id=x", "cgroup=x", "9lead=x", "a b=x", "k=" + "x" * 200, "k=\x07"):
        with pytest.raises(LabelError):
            parse_kv(bad)
    with pytest.raises(LabelError):
        check_value(b"\xff\xfe")


@pytest.mark.parametrize("path,runtime,cid,pod,qos", [
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
     "containerd", CID, POD, "burstable"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD.replace('-', '_')}.slice/crio-{CID}.scope",
     "cri-o", CID, POD, "besteffort"),
    (f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope", "containerd", CID, POD, "guaranteed"),
    (f"/kubepods/burstable/pod{POD}/{CID}", "cri", CID, POD, "burstable"),
    (f"/system.slice/docker-{CID}.scope", "docker", CID, None, None),
    (f"/docker/{CID}", "docker", CID, None, None),
    (f"/machine.slice/libpod-{CID}.scope", "podman", CID, None, None),
    ("/system.slice/run-r0123456789abcdef.scope", "systemd", "run-r0123456789abcdef", None, None),
    ("/agents/a1", None, None, None, None),
])
def test_container_identity_names(path, runtime, cid, pod, qos):
    got = identity(path)
    assert (got.get("container") or {}).get("runtime") == runtime
    assert (got.get("container") or {}).get("id") == cid
    assert (got.get("pod") or {}).get("uid") == pod
    assert (got.get("pod") or {}).get("qos") == qos


def test_container_identity_on_records_from_real_cgroups(agent_tree, make_session):
    """Cgroups named like a containerd Kubernetes pod container, a CRI-O one, a Docker
    (systemd driver) one and a systemd-run scope: their records carry runtime, id and pod."""
    pod_slice = agent_tree.root / "kubepods.slice" / "kubepods-burstable.slice" / \
        f"kubepods-burstable-pod{POD.replace('-', '_')}.slice"
    crio_slice = agent_tree.root / "kubepods.slice" / "kubepods-besteffort.slice" / \
        f"kubepods-besteffort-pod{POD.replace('-', '_')}.slice"
    system = agent_tree.root / "system.slice"
    for d in (pod_slice, crio_slice, system):
        d.mkdir(parents=True)
    ctr = pod_slice / f"cri-containerd-{CID}.scope"
    crio = crio_slice / f"crio-{CID[::-1]}.scope"
    dock = system / f"docker-{CID}.scope"
    unit = system / "run-r42.scope"
    for d in (ctr, crio, dock, unit):
        d.mkdir()
    sess = make_session([pod_slice, crio_slice, system])
    for d in (ctr, crio, dock, unit):
        agent_tree.run(d, ["/bin/true", f"in-{d.name[:12]}"])
    want = {ctr.name: ("containerd", CID, POD, "burstable"), crio.name: ("cri-o", CID[::-1], POD, "besteffort"),
            dock.name: ("docker", CID, None, None), unit.name: ("systemd", "run-r42", None, None)}
    assert sess.wait_for(lambda: {r["agent"]["id"] for r in sess.of("exec")} >= set(want))
    for r in sess.of("exec"):
        rt, cid, pod, qos = want[r["agent"]["id"]]
        assert r["agent"]["container"] == {"runtime": rt, "id": cid}
        assert (r["agent"].get("pod") or {}).get("uid") == pod
        assert (r["agent"].get("pod") or {}).get("qos") == qos
    from jsonschema import Draft202012Validator
    from agenttrace.paths import schema_dir
    v = Draft202012Validator(json.loads((schema_dir() / "event.schema.json").read_text()))
    assert [e.message for r in sess.records for e in v.iter_errors(r)] == []
