"""Container and Kubernetes pod identity from a cgroup path.

Runtimes name the cgroups they create in recognisable ways; nothing is asked of the runtime
itself (no socket, no API), so this works for any process agenttrace attributes to a cgroup:

  systemd driver   /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
                   .../crio-<id>.scope   /system.slice/docker-<id>.scope   .../libpod-<id>.scope
  cgroupfs driver  /kubepods/besteffort/pod<uid>/<id>   /docker/<id>
  other scopes     /user.slice/.../session-3.scope, run-r<hex>.scope (systemd-run)

A Guaranteed pod has no QoS level in its path (kubepods[.slice]/…pod<uid>…).
"""
from __future__ import annotations

import re

_ID = r"[0-9a-f]{64}"
_SCOPE = re.compile(r"^(?:(cri-containerd|crio|docker|libpod)-)(" + _ID + r")\.scope$")
_BARE_ID = re.compile(r"^(" + _ID + r")$")
_POD = re.compile(r"^(?:kubepods(?:-(?:burstable|besteffort))?-)?pod([0-9a-f_-]{36})(?:\.slice)?$")
_RUNTIMES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker", "libpod": "podman"}
_QOS = {"burstable": "burstable", "besteffort": "besteffort"}


def identity(cgroup: str | None) -> dict:
    """{"container": {"runtime", "id"}, "pod": {"uid", "qos"}} (only what the path shows)."""
    if not cgroup:
        return {}
    parts = [p for p in cgroup.split("/") if p]
    out: dict = {}
    kube = False
    qos = None
    prev = None
    scope = None
    for part in parts:
        if part in ("kubepods", "kubepods.slice"):
            kube = True
        elif kube and part.startswith("kubepods-") and part.endswith(".slice") and \
                part[len("kubepods-"):-len(".slice")] in _QOS:
            qos = part[len("kubepods-"):-len(".slice")]
        elif kube and part in _QOS and prev in ("kubepods",):
            qos = part
        m = _POD.match(part)
        if kube and m:
            out["pod"] = {"uid": m.group(1).replace("_", "-"), "qos": qos or "guaranteed"}
        m = _SCOPE.match(part)
        if m:
            out["container"] = {"runtime": _RUNTIMES[m.group(1)], "id": m.group(2)}
        elif _BARE_ID.match(part):
            # cgroupfs driver: /kubepods/<qos>/pod<uid>/<id> (runtime not in the path) or /docker/<id>
            rt = "docker" if prev == "docker" else ("cri" if "pod" in out else "unknown")
            out["container"] = {"runtime": rt, "id": part}
        elif part.endswith(".scope") and "container" not in out:
            scope = part[:-len(".scope")]
        prev = part
    if "container" not in out and scope:
        # a systemd scope that is no container: the unit is the identity (session, systemd-run)
        out["container"] = {"runtime": "systemd", "id": scope}
    return out
