"""The GPU device fence (probes/device.c) in the real kernel.

A char device node with the NVIDIA major (195) is made with mknod in a temp dir; a process
in an agent cgroup opens it. No driver is bound to 195 here, so an open the fence allows
fails later with ENXIO, and one it denies fails with EPERM: the errno tells the verdicts
apart without a GPU.
"""
from __future__ import annotations

import ctypes as C
import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agenttrace.enrich import cgroups
from conftest import AgentTree, need_bpf
from agenttrace.gpu.service import NVIDIA_MAJOR, GpuConfig, GpuFence, device_body, nvidia_uvm_major

pytestmark = pytest.mark.bpf

OPEN = r"""
import os, sys
try:
    os.close(os.open(sys.argv[1], os.O_RDWR))
    print(os.getpid(), 0)
except OSError as e:
    print(os.getpid(), e.errno)
"""


@pytest.fixture(scope="module")
def probes():
    need_bpf()
    from agenttrace.kernel.loader import Probes
    p = Probes(features=("device",), extra_cflags=[f"-DAT_NVIDIA_UVM_MAJOR={nvidia_uvm_major() or 0}"])
    p.load()  # a compile or verifier error must fail loudly, not skip
    records = []

    def on_event(ctx, data, size):
        from agenttrace.kernel.wire import Device
        records.append(Device.from_buffer_copy(C.string_at(data, C.sizeof(Device))))

    p.bpf[b"events"].open_ring_buffer(on_event)
    p.records = records
    try:
        yield p
    finally:
        p.close()


def _free_major() -> int:
    with open("/proc/devices") as f:
        used = {int(s.split()[0]) for s in f if s.strip() and s.strip()[0].isdigit()}
    for m in list(range(240, 255)) + list(range(60, 64)) + list(range(120, 128)):
        if m not in used:
            return m
    pytest.skip("no unregistered experimental char major to test with")


@pytest.fixture
def lab(probes, agent_tree, tmp_path):
    watched = agent_tree.root
    denied, allowed = agent_tree.agent("sandbox"), agent_tree.agent("trainer")
    nodes = {}
    for name, major, minor in (("nvidia0", NVIDIA_MAJOR, 0), ("nvidiactl", NVIDIA_MAJOR, 255),
                               ("null", 1, 3), ("extra", _free_major(), 0)):
        path = tmp_path / name
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        nodes[name] = path
    cid = probes.watch(watched)
    probes.bpf.ring_buffer_poll(0)  # drain what earlier tests left unread
    probes.records.clear()
    lab = type("Lab", (), {})()
    lab.watched, lab.denied, lab.allowed, lab.nodes, lab.probes = watched, denied, allowed, nodes, probes
    try:
        yield lab
    finally:
        probes.unwatch(cid)
        probes.bpf[b"gpu_policy"].clear()


def _open_in(cg: Path, path: Path) -> tuple[int, int]:
    """(pid, errno or 0) of a child that opens `path` read-write from inside cgroup `cg`."""
    procs = str(cg / "cgroup.procs")

    def enter():
        with open(procs, "w") as f:
            f.write("0")

    p = subprocess.run([sys.executable, "-c", OPEN, str(path)], preexec_fn=enter, capture_output=True, text=True,
                       check=True, timeout=60)
    pid, err = p.stdout.split()
    return int(pid), int(err)


def _events(lab):
    lab.probes.bpf.ring_buffer_poll(100)
    out = list(lab.probes.records)
    lab.probes.records.clear()
    return out


def _mode(lab, mode: str) -> None:
    """The session's one enforce switch (at_config[AT_CFG_ENFORCE]), as Tracer.set_mode writes it."""
    from agenttrace.kernel.wire import CFG_ENFORCE
    lab.probes.set_flag("at_config", CFG_ENFORCE, 1 if mode == "enforce" else 0)


def _fence(lab, mode: str, **cfg):
    config = GpuConfig(**cfg)
    f = GpuFence(lab.probes, config, mode)
    f.install()
    _mode(lab, mode)
    return f, config


def test_monitor_mode_reports_and_allows(lab):
    _fence(lab, "monitor")
    pid, err = _open_in(lab.denied, lab.nodes["nvidia0"])
    assert err == errno.ENXIO   # allowed by the fence; no driver behind major 195 here
    evs = _events(lab)
    assert len(evs) == 1
    e = evs[0]
    agent_id = os.stat(lab.denied).st_ino
    assert (e.h.type, e.major, e.minor, e.dev_type, e.verdict) == (9, 195, 0, 2, 0)
    assert e.h.agent_cgroup_id == agent_id and e.h.cgroup_id == agent_id
    assert e.h.tgid == pid and e.h.comm.startswith(b"python")
    assert device_body(e.major, e.minor, e.access, e.dev_type, e.verdict)["access"] == "rw"


def test_enforce_mode_denies_agents_not_allowed_gpus(lab):
    fence, _ = _fence(lab, "enforce", groups=[{"agents": ["trainer"], "allowed": True}])
    fence.set_agent({"id": "trainer", "cgroup": "/x/trainer", "cgroup_id": os.stat(lab.allowed).st_ino})
    fence.set_agent({"id": "sandbox", "cgroup": "/x/sandbox", "cgroup_id": os.stat(lab.denied).st_ino})
    assert _open_in(lab.denied, lab.nodes["nvidia0"])[1] == errno.EPERM
    assert _open_in(lab.denied, lab.nodes["nvidiactl"])[1] == errno.EPERM
    assert _open_in(lab.allowed, lab.nodes["nvidia0"])[1] == errno.ENXIO
    evs = _events(lab)
    got = sorted((e.h.agent_cgroup_id, e.minor, e.verdict) for e in evs)
    assert got == sorted([(os.stat(lab.denied).st_ino, 0, 1), (os.stat(lab.denied).st_ino, 255, 1),
                          (os.stat(lab.allowed).st_ino, 0, 0)])


def test_new_agent_without_policy_entry_gets_the_default(lab):
    _fence(lab, "enforce")                       # default: agents are not allowed GPUs
    fresh = lab.watched / "fresh"
    fresh.mkdir()
    try:
        assert _open_in(fresh, lab.nodes["nvidia0"])[1] == errno.EPERM
        assert [(e.h.agent_cgroup_id, e.verdict) for e in _events(lab)] == [(os.stat(fresh).st_ino, 1)]
        _fence(lab, "enforce", default={"allowed": True})
        assert _open_in(fresh, lab.nodes["nvidia0"])[1] == errno.ENXIO
    finally:
        fresh.rmdir()


def test_other_devices_are_untouched_and_unreported(lab):
    _fence(lab, "enforce")
    assert _open_in(lab.denied, lab.nodes["null"])[1] == 0
    assert _events(lab) == []


def test_extra_gpu_major_from_the_map(lab):
    extra = os.major(lab.nodes["extra"].stat().st_rdev)
    _fence(lab, "enforce")
    assert _open_in(lab.denied, lab.nodes["extra"])[1] == errno.ENXIO   # not a GPU major yet
    assert _events(lab) == []
    _fence(lab, "enforce", extra_device_majors=[extra])
    assert _open_in(lab.denied, lab.nodes["extra"])[1] == errno.EPERM
    assert [(e.major, e.verdict) for e in _events(lab)] == [(extra, 1)]
    t = lab.probes.bpf[b"gpu_dev_majors"]
    del t[t.Key(extra)]


def test_processes_outside_watched_cgroups_are_not_fenced(lab):
    _fence(lab, "enforce")
    outside = AgentTree(Path(cgroups.cgroup2_mount()))
    try:
        assert _open_in(outside.root, lab.nodes["nvidia0"])[1] == errno.ENXIO
        assert _events(lab) == []
    finally:
        outside.cleanup()


def test_service_installs_the_fence_by_mode_and_config(lab):
    from agenttrace.gpu.service import GpuService
    from agenttrace.gpu.fake import FakeBackend

    fixture = Path(__file__).parent / "fixtures" / "gpu_unavailable.yaml"
    trainer = {"id": "trainer", "cgroup": "/t", "cgroup_id": os.stat(lab.allowed).st_ino}
    cfg = GpuConfig(groups=[{"agents": ["trainer"], "allowed": True}])
    svc = GpuService(cfg, lambda pid: None, mode="enforce", backend=FakeBackend(fixture))
    svc.install_fence(lab.probes)
    _mode(lab, "enforce")
    svc.agent_seen(trainer)
    assert _open_in(lab.denied, lab.nodes["nvidia0"])[1] == errno.EPERM
    assert _open_in(lab.allowed, lab.nodes["nvidia0"])[1] == errno.ENXIO
    svc.agent_gone(trainer["cgroup_id"])  # back to the default for unknown agents: deny
    assert _open_in(lab.allowed, lab.nodes["nvidia0"])[1] == errno.EPERM
    # fence: monitor keeps reporting but never denies, even in enforce mode
    mon = GpuService(cfg.model_copy(update={"fence": "monitor"}), lambda pid: None, mode="enforce",
                     backend=FakeBackend(fixture))
    mon.install_fence(lab.probes)
    _events(lab)
    assert _open_in(lab.denied, lab.nodes["nvidia0"])[1] == errno.ENXIO
    assert [(e.h.agent_cgroup_id, e.verdict) for e in _events(lab)] == [(os.stat(lab.denied).st_ino, 0)]
