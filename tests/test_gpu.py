"""GPU awareness with the fake NVML: real processes in real agent cgroups stand in as GPU holders.

Only the hardware is faked (there is no GPU here): the pids NVML reports are real `sleep`
processes, attribution reads their real /proc and cgroup membership, and time moves on a
FakeClock so nothing sleeps or depends on timing.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
import types
from pathlib import Path

import pynvml
import pytest
from pydantic import ValidationError

from agenttrace.enrich import cgroups
from conftest import AgentTree
from agenttrace.clock import FakeClock
from agenttrace.gpu.service import (GpuConfig, GpuEnricher, GpuSampler, GpuTracker, GpuUnavailable, NvmlBackend,
                            ProcfsResolver, device_body, nvidia_majors, nvidia_uvm_major, nvml_status)
from agenttrace.gpu.fake import FakeBackend, FixtureError, load_fixture, parse_fixture
from agenttrace.session.event import Event

FIX = Path(__file__).parent / "fixtures"


class Tree:
    """The conftest agent tree (watched cgroup) with agent `a1`, a non-agent cgroup outside it,
    and `sleep` processes placed in them."""

    def __init__(self, agents: AgentTree, outside: AgentTree):
        self.mount = Path(cgroups.cgroup2_mount())
        self._trees = (agents, outside)
        self.watched = agents.root
        self.agent = agents.agent("a1")
        self.other = outside.root
        self.procs: list[subprocess.Popen] = []

    def rel(self, p: Path) -> str:
        return "/" + str(p.relative_to(self.mount))

    def spawn(self, cg: Path) -> int:
        p = self._trees[0].spawn(cg, ["sleep", "1000"])
        self.procs.append(p)
        return p.pid

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def tree(agent_tree, cgroup2_root):
    outside = AgentTree(cgroup2_root)
    t = Tree(agent_tree, outside)
    try:
        yield t
    finally:
        t.close()
        outside.cleanup()


def _setup(tree: Tree, fixture: str, config: GpuConfig | None = None, interval_s: float = 1.0):
    clock = FakeClock()
    backend = FakeBackend(FIX / fixture, clock)
    worker, trainer = tree.spawn(tree.agent), tree.spawn(tree.other)
    backend.bind("worker", worker)
    backend.bind("trainer", trainer)
    notices: list[tuple[str, str]] = []
    sampler = GpuSampler(backend, interval_s, clock=clock, notice=lambda c, m: notices.append((c, m)))
    assert sampler.open()
    resolver = ProcfsResolver([str(tree.watched)])
    tracker = GpuTracker(resolver, config or GpuConfig(), node="testnode")
    return clock, backend, sampler, tracker, notices, worker, trainer


def _step(clock, sampler, tracker, to_s: float, start_s: list):
    clock.advance(to_s - start_s[0])
    start_s[0] = to_s
    sampler.sample_once()
    return tracker.update(sampler.latest)


def test_agent_and_non_agent_holders_are_attributed(tree):
    cfg = GpuConfig(trainers=[{"gpus": [1], "exe": ["*/sleep"], "cgroup": [tree.rel(tree.other)]}])
    clock, backend, sampler, tracker, notices, worker, trainer = _setup(tree, "gpu_two_holders.yaml", cfg)
    now = [0.0]

    evs = _step(clock, sampler, tracker, 0, now)
    assert [(e.kind, e.pid, e.record["gpu"]["change"]) for e in evs] == [("gpu", trainer, "acquired")]
    t = evs[0]
    assert t.record["agent"] is None and t.agent_cgroup_id == 0   # non-agent holder
    assert t.record["gpu"]["index"] == 1
    assert t.record["gpu"]["uuid"] == "GPU-00000000-0000-0000-0000-00000000bbbb"
    assert t.record["gpu"]["used_memory_mib"] == 40000 and t.record["gpu"]["sm_util_pct"] == 70
    assert t.record["gpu"]["trainer"] is True        # the configured trainer of GPU 1
    assert t.record["gpu"]["allowed"] is None        # group policy applies to agents only

    evs = _step(clock, sampler, tracker, 5, now)
    assert [(e.pid, e.record["gpu"]["change"]) for e in evs] == [(worker, "acquired")]
    w = evs[0]
    agent_id = os.stat(tree.agent).st_ino
    assert w.record["agent"] == {"id": "a1", "cgroup": tree.rel(tree.agent), "cgroup_id": agent_id}
    assert w.agent_cgroup_id == agent_id
    proc = w.record["proc"]
    assert proc["pid"] == worker and proc["comm"] == "sleep" and proc["exe"].endswith("/sleep")
    assert proc["args"] == ["sleep", "1000"] and proc["ppid"] == os.getpid()
    assert proc["ancestry"][0]["pid"] == os.getpid()
    g = w.record["gpu"]
    assert (g["index"], g["name"], g["used_memory_mib"], g["sm_util_pct"]) == (0, "NVIDIA H100 80GB HBM3", 1000, 20)
    assert g["allowed"] is False                     # default policy: agents get no GPU
    assert g["trainer"] is False                     # no trainer is configured for GPU 0
    assert w.record["kind"] == "gpu" and w.record["node"] == "testnode" and w.record["ts"].endswith("Z")
    assert w.t_ns == sampler.latest.wall_ns

    # Other events of the holder carry its GPU summary; events of other pids do not.
    enr = GpuEnricher(sampler, tracker)
    ev = Event("connect", 1, {"kind": "connect", "proc": {"pid": worker}}, pid=worker)
    assert enr(ev) == [ev]
    s = ev.record["proc"]["gpu"]
    assert (s["index"], s["used_memory_mib"], s["count"]) == (0, 1000, 1)
    other = Event("exec", 1, {"kind": "exec", "proc": {"pid": os.getpid()}}, pid=os.getpid())
    enr(other)
    assert "gpu" not in other.record["proc"]

    # Release: the worker's context disappears from NVML.
    for t_s in (10, 20, 25):
        _step(clock, sampler, tracker, t_s, now)
    evs = _step(clock, sampler, tracker, 30, now)
    assert [(e.pid, e.record["gpu"]["change"]) for e in evs] == [(worker, "released")]
    assert tracker.summary(worker) is None
    assert tracker.summary(trainer)["index"] == 1
    assert notices == []


def test_thresholds_and_quota(tree):
    cfg = GpuConfig(thresholds={"memory_mib": 4000, "sm_util_pct": 90, "sustain_s": 8},
                    groups=[{"agents": ["a*"], "allowed": True, "memory_quota_mib": 3000}])
    clock, backend, sampler, tracker, notices, worker, trainer = _setup(tree, "gpu_two_holders.yaml", cfg)
    now = [0.0]
    ev0 = _step(clock, sampler, tracker, 0, now)
    # The non-agent trainer is above the memory threshold from its first sample.
    assert [(e.pid, e.record["gpu"]["change"], e.record["gpu"].get("threshold", {}).get("metric")) for e in ev0] == \
        [(trainer, "acquired", None), (trainer, "threshold", "memory_mib")]
    acq = _step(clock, sampler, tracker, 5, now)
    assert [e.record["gpu"]["change"] for e in acq] == ["acquired"]
    assert acq[0].record["gpu"]["allowed"] is True and acq[0].record["gpu"]["memory_quota_mib"] == 3000

    def th(evs):
        return [(e.pid, e.record["gpu"]["threshold"]["metric"], e.record["gpu"]["threshold"]["direction"])
                for e in evs if e.record["gpu"]["change"] == "threshold"]

    # t=10: memory 5000 > 4000 and the agent's 5000 > its 3000 quota; SM 95 > 90 but not yet sustained.
    evs = _step(clock, sampler, tracker, 10, now)
    assert th(evs) == [(worker, "memory_mib", "above"), (worker, "agent_memory_mib", "above")]
    q = evs[-1].record["gpu"]
    assert q["threshold"] == {"metric": "agent_memory_mib", "limit": 3000, "value": 5000, "direction": "above"}
    assert q["agent_used_memory_mib"] == 5000
    assert evs[-1].record["agent"]["id"] == "a1"
    # t=20: SM has stayed above 90 for 10 s >= 8 s.
    evs = _step(clock, sampler, tracker, 20, now)
    assert th(evs) == [(worker, "sm_util_pct", "above")]
    assert evs[0].record["gpu"]["threshold"]["sustained_s"] == 10.0
    # Same state again: crossings are reported once.
    clock.advance(1)
    now[0] += 1
    sampler.sample_once()
    assert tracker.update(sampler.latest) == []
    # t=25: everything falls back under the limits.
    evs = _step(clock, sampler, tracker, 25, now)
    assert sorted(th(evs)) == sorted([(worker, "memory_mib", "below"), (worker, "sm_util_pct", "below"),
                                      (worker, "agent_memory_mib", "below")])


def test_sm_dip_restarts_the_sustain_window(tree):
    cfg = GpuConfig(thresholds={"sm_util_pct": 90, "sustain_s": 8})
    clock, backend, sampler, tracker, notices, worker, trainer = _setup(tree, "gpu_two_holders.yaml", cfg)
    now = [0.0]
    for t_s in (0, 5, 10):
        assert not [e for e in _step(clock, sampler, tracker, t_s, now) if e.record["gpu"]["change"] == "threshold"]
    # 7 s above is short of 8 s; dropping below at 25 must not leave a partial window behind.
    evs = _step(clock, sampler, tracker, 17, now)
    assert not [e for e in evs if e.record["gpu"]["change"] == "threshold"]
    evs = _step(clock, sampler, tracker, 25, now)
    assert not [e for e in evs if e.record["gpu"]["change"] == "threshold"]  # never went "above": no "below"


def test_nvml_errors_mid_run_one_notice_then_recovery(tree):
    clock, backend, sampler, tracker, notices, worker, trainer = _setup(tree, "gpu_errors.yaml", interval_s=2.0)
    enr = GpuEnricher(sampler, tracker)
    assert sampler.tick()
    first = enr.poll()
    assert [(e.pid, e.record["gpu"]["change"]) for e in first] == [(worker, "acquired")]
    assert first[0].record["gpu"]["sm_util_pct"] is None   # the driver reports no per-process use
    good = sampler.latest

    clock.advance(10)
    assert sampler.tick() and sampler.failing
    assert notices == [("gpu_error", "GPU sampling failed, backing off: NVMLError_Unknown: Unknown Error")]
    assert sampler.latest is good
    # Back-off: the next try is due 4 s later (2 × interval), not at the interval.
    clock.advance(2)
    assert not sampler.tick()
    clock.advance(2)
    assert sampler.tick()                                  # fails again (GpuIsLost on processes), quietly
    assert len(notices) == 1 and sampler.errors == 2
    # The pipeline keeps going meanwhile: no released event, the holder keeps its summary.
    ev = Event("exec", 1, {"kind": "exec", "proc": {"pid": worker}}, pid=worker)
    assert enr(ev) == [ev] and ev.record["proc"]["gpu"]["used_memory_mib"] == 2048

    clock.advance(16)                                      # t=30: NVML answers again
    assert sampler.tick() and not sampler.failing
    assert notices[-1] == ("gpu_recovered", "GPU sampling resumed")
    assert len(notices) == 2
    assert enr.poll() == []                                # same holder, nothing changed
    assert tracker.summary(worker)["used_memory_mib"] == 2048


def test_unavailable_backend_gives_one_notice_and_passes_events_through():
    clock = FakeClock()
    notices = []
    sampler = GpuSampler(FakeBackend(FIX / "gpu_unavailable.yaml", clock), 1.0, clock=clock,
                         notice=lambda c, m: notices.append((c, m)))
    sampler.start()
    sampler._thread.join(10)  # the thread ends by itself when init fails
    assert not sampler._thread.is_alive()
    sampler.stop()
    assert notices == [("gpu_unavailable", "GPU enrichment off: NVIDIA kernel driver is not loaded (nvidia module missing)")]
    assert sampler.latest is None and sampler.available is False
    enr = GpuEnricher(sampler, GpuTracker(lambda pid: None, node="n"))
    ev = Event("exec", 1, {"kind": "exec", "proc": {"pid": os.getpid()}}, pid=os.getpid())
    assert enr(ev) == [ev] and "gpu" not in ev.record["proc"]


class _BlockingBackend(FakeBackend):
    """processes() blocks until released: a hung NVML call."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.block = False

    def processes(self, index):
        if self.block:
            self.entered.set()
            self.release.wait()
        return super().processes(index)


def test_hung_nvml_call_never_stalls_the_pipeline(tree):
    clock = FakeClock()
    backend = _BlockingBackend(FIX / "gpu_errors.yaml", clock)
    worker = tree.spawn(tree.agent)
    backend.bind("worker", worker)
    sampler = GpuSampler(backend, 0.05)   # real clock: the background thread is what is under test
    tracker = GpuTracker(ProcfsResolver([str(tree.watched)]), node="n")
    enr = GpuEnricher(sampler, tracker)
    sampler.start()
    try:
        while sampler.latest is None:
            time.sleep(0.01)
        assert [e.record["gpu"]["change"] for e in enr.poll()] == ["acquired"]
        backend.block = True
        assert backend.entered.wait(30)
        # The sampler thread is stuck inside NVML; events still go through with the last snapshot.
        ev = Event("exec", 1, {"kind": "exec", "proc": {"pid": worker}}, pid=worker)
        assert enr(ev) == [ev] and ev.record["proc"]["gpu"]["used_memory_mib"] == 2048
    finally:
        backend.release.set()
        sampler.stop()


def test_latest_is_swapped_whole(tree):
    clock, backend, sampler, tracker, notices, worker, trainer = _setup(tree, "gpu_two_holders.yaml")
    a = sampler.sample_once()
    clock.advance(5)
    b = sampler.sample_once()
    assert a is not b and b.seq == a.seq + 1 and sampler.latest is b
    assert set(a.by_pid) == {trainer} and set(b.by_pid) == {trainer, worker}
    with pytest.raises(TypeError):
        b.by_pid[1] = ()   # read-only mapping: readers share it without copying
    with pytest.raises(AttributeError):
        b.seq = 0


def test_tracker_ignores_a_snapshot_it_has_seen(tree):
    clock, backend, sampler, tracker, notices, worker, trainer = _setup(tree, "gpu_two_holders.yaml")
    s = sampler.sample_once()
    assert len(tracker.update(s)) == 1
    assert tracker.update(s) == [] and tracker.update(None) == []


def test_vanished_pid_is_reported_without_identity(tree):
    clock = FakeClock()
    backend = FakeBackend(parse_fixture("gpus: [{index: 0, uuid: GPU-z}]\ntimeline:\n"
                                        "  - {at: 0, procs: [{pid: 999999999, gpu: 0, memory_mib: 1}]}\n"), clock)
    sampler = GpuSampler(backend, 1.0, clock=clock)
    sampler.open()
    tracker = GpuTracker(ProcfsResolver([str(tree.watched)]), node="n")
    evs = tracker.update(sampler.sample_once())
    assert evs[0].record["agent"] is None and evs[0].record["proc"]["pid"] == 999999999


def test_process_directly_in_watched_cgroup_is_agent_named_after_it(tree):
    pid = tree.spawn(tree.watched)
    proc, agent = ProcfsResolver([tree.rel(tree.watched)])(pid)
    assert agent == {"id": tree.watched.name, "cgroup": tree.rel(tree.watched),
                     "cgroup_id": os.stat(tree.watched).st_ino}
    assert proc["pid"] == pid


# ---- the real NVML backend's error handling (no GPU here; a stand-in module for the driver)


def test_real_nvml_without_driver_is_unavailable_with_reason():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver; tests/gpu_real_check.py covers it")
    with pytest.raises(GpuUnavailable) as ei:
        NvmlBackend().init()
    assert "libnvidia-ml.so.1" in ei.value.reason or "driver" in ei.value.reason
    st = nvml_status()
    assert st["available"] is False and st["reason"] == ei.value.reason == st["detail"]


def _stand_in(**over):
    """A pynvml-shaped module: real exception classes, scripted answers."""
    P = types.SimpleNamespace
    mod = types.SimpleNamespace(
        NVMLError=pynvml.NVMLError, NVMLError_NotSupported=pynvml.NVMLError_NotSupported,
        NVMLError_NotFound=pynvml.NVMLError_NotFound, NVMLError_LibraryNotFound=pynvml.NVMLError_LibraryNotFound,
        NVMLError_DriverNotLoaded=pynvml.NVMLError_DriverNotLoaded,
        NVMLError_NoPermission=pynvml.NVMLError_NoPermission,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: ("h", i),
        nvmlDeviceGetUUID=lambda h: b"GPU-abc", nvmlDeviceGetName=lambda h: "Tesla T4",
        nvmlDeviceGetMemoryInfo=lambda h: P(total=16 * 1024 ** 3),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [P(pid=10, usedGpuMemory=512 * 1024 ** 2), P(pid=11, usedGpuMemory=None)],
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: [P(pid=10, usedGpuMemory=256 * 1024 ** 2)],
        nvmlDeviceGetUtilizationRates=lambda h: P(gpu=55, memory=12),
        nvmlDeviceGetProcessUtilization=lambda h, ts: [P(pid=10, timeStamp=5, smUtil=40, memUtil=4),
                                                       P(pid=10, timeStamp=9, smUtil=60, memUtil=6),
                                                       P(pid=10, timeStamp=7, smUtil=10, memUtil=1)],
    )
    for k, v in over.items():
        setattr(mod, k, v)
    return mod


def _raise(cls):
    def f(*a):
        raise cls()
    return f


def test_nvml_backend_reads_and_merges():
    b = NvmlBackend(_stand_in())
    b.init()
    assert [(d.index, d.uuid, d.name, d.memory_total_mib) for d in b.devices()] == [(0, "GPU-abc", "Tesla T4", 16384)]
    assert [(p.pid, p.used_memory_mib, p.kind) for p in b.processes(0)] == [(10, 512, "compute"), (11, None, "compute"), (10, 256, "graphics")]
    assert b.utilization(0) == (55, 12)
    assert b.process_utilization(0, 0) == {10: (60, 6)}   # the newest sample per pid
    clock = FakeClock()
    s = GpuSampler(b, 1.0, clock=clock).sample_once()
    uses = {u.pid: u for u in s.by_pid[10] + s.by_pid[11]}
    assert (uses[10].used_memory_mib, uses[10].sm_util_pct, uses[11].used_memory_mib) == (512, 60, None)


def test_nvml_backend_not_supported_is_per_call():
    b = NvmlBackend(_stand_in(nvmlDeviceGetProcessUtilization=_raise(pynvml.NVMLError_NotSupported),
                              nvmlDeviceGetGraphicsRunningProcesses=_raise(pynvml.NVMLError_NotSupported),
                              nvmlDeviceGetUtilizationRates=_raise(pynvml.NVMLError_NotSupported),
                              nvmlDeviceGetMemoryInfo=_raise(pynvml.NVMLError_NotSupported)))
    b.init()
    assert b.devices()[0].memory_total_mib is None
    assert [p.pid for p in b.processes(0)] == [10, 11]
    assert b.utilization(0) == (None, None)
    assert b.process_utilization(0, 0) == {}
    # No sample newer than the timestamp is "nothing to report", not a failure.
    b2 = NvmlBackend(_stand_in(nvmlDeviceGetProcessUtilization=_raise(pynvml.NVMLError_NotFound)))
    b2.init()
    assert b2.process_utilization(0, 0) == {}


@pytest.mark.parametrize("err,needle", [(pynvml.NVMLError_LibraryNotFound, "libnvidia-ml.so.1"),
                                        (pynvml.NVMLError_DriverNotLoaded, "driver is not loaded"),
                                        (pynvml.NVMLError_NoPermission, "permission")])
def test_nvml_backend_init_failures_name_the_cause(err, needle):
    with pytest.raises(GpuUnavailable, match=needle):
        NvmlBackend(_stand_in(nvmlInit=_raise(err))).init()


def test_nvml_backend_no_gpu():
    with pytest.raises(GpuUnavailable, match="no GPU"):
        NvmlBackend(_stand_in(nvmlDeviceGetCount=lambda: 0)).init()


def test_other_nvml_errors_fail_the_sample_not_the_backend():
    clock = FakeClock()
    notices = []
    b = NvmlBackend(_stand_in(nvmlDeviceGetComputeRunningProcesses=_raise(pynvml.NVMLError_GpuIsLost)))
    s = GpuSampler(b, 1.0, clock=clock, notice=lambda c, m: notices.append(c))
    assert s.open()
    assert s.sample_once() is None and notices == ["gpu_error"]


# ---- configuration and fixtures


def test_config_model_validates():
    c = GpuConfig.model_validate({"interval_s": 5, "groups": [{"agents": ["trainer-*", "/gpu/*"], "allowed": True}],
                                  "trainers": [{"gpus": [0, "GPU-abc"], "exe": ["/opt/train/bin/*"]}]})
    assert c.policy_for({"id": "trainer-3", "cgroup": "/agents/trainer-3"}).allowed is True
    assert c.policy_for({"id": "x", "cgroup": "/gpu/x"}).allowed is True
    assert c.policy_for({"id": "x", "cgroup": "/agents/x"}).allowed is False
    assert c.policy_for(None) is None
    assert c.trainer_ok(0, "GPU-zzz", "/opt/train/bin/python", "/") is True
    assert c.trainer_ok(1, "GPU-abc", "/opt/train/bin/python", "/") is True
    assert c.trainer_ok(1, "GPU-zzz", "/opt/train/bin/python", "/") is False
    assert GpuConfig().trainer_ok(0, "u", "/x", "/") is None
    for bad in ({"interval_s": 0}, {"trainers": [{"gpus": [0]}]}, {"thresholds": {"sm_util_pct": 120}},
                {"colour": 1}, {"extra_device_majors": [0]}):
        with pytest.raises(ValidationError):
            GpuConfig.model_validate(bad)


def test_bad_fixture_names_file_line_and_field():
    with pytest.raises(FixtureError) as ei:
        load_fixture(FIX / "gpu_bad.yaml")
    assert str(ei.value).startswith(f"{FIX / 'gpu_bad.yaml'}:6: timeline.0.procs.0.colour:")
    with pytest.raises(FixtureError, match=r"<fixture>:3: timeline.0.error.code: .*unknown NVML error 'Bogus'"):
        parse_fixture("gpus: [{index: 0, uuid: u}]\ntimeline:\n  - {at: 0, error: Bogus}\n")
    with pytest.raises(FixtureError, match="must be in time order"):
        parse_fixture("gpus: [{index: 0, uuid: u}]\ntimeline:\n  - {at: 5}\n  - {at: 1}\n")


def test_unbound_symbolic_pid_is_a_clear_error():
    clock = FakeClock()
    b = FakeBackend(parse_fixture("gpus: [{index: 0, uuid: u}]\ntimeline:\n  - {at: 0, procs: [{pid: ghost, gpu: 0}]}\n"), clock)
    b.init()
    with pytest.raises(KeyError, match="'ghost' is not bound"):
        b.processes(0)


# ---- device helpers


def test_nvidia_majors_from_proc_devices(tmp_path):
    f = tmp_path / "devices"
    f.write_text("Character devices:\n  1 mem\n195 nvidia-frontend\n235 nvidia-caps\n"
                 "508 nvidia-uvm\n\nBlock devices:\n  7 loop\n509 nvidia-uvm\n")
    assert nvidia_majors(str(f)) == {195: "nvidia-frontend", 235: "nvidia-caps", 508: "nvidia-uvm"}
    assert nvidia_uvm_major(str(f)) == 508
    assert nvidia_uvm_major(str(tmp_path / "missing")) is None


def test_device_body():
    assert device_body(195, 0, 2 | 4, 2, 1, {195: "nvidia"}) == {
        "major": 195, "minor": 0, "access": "rw", "type": "char", "name": "nvidia",
        "verdict": "blocked"}


def test_table_resolver_on_the_process_table(tree):
    from agenttrace.enrich.cgroups import AgentResolver
    from agenttrace.gpu.service import table_resolver
    from agenttrace.enrich.proctable import ProcTable

    agents = AgentResolver(labels={"pool": "rl"})
    agents.watch(tree.watched)
    resolve = table_resolver(ProcTable(), agents)
    inside, outside = tree.spawn(tree.agent), tree.spawn(tree.other)
    proc, agent = resolve(inside)
    assert agent == {"id": "a1", "cgroup": tree.rel(tree.agent), "cgroup_id": os.stat(tree.agent).st_ino, "pool": "rl"}
    assert proc["pid"] == inside and proc["exe"].endswith("/sleep") and proc["ancestry"][0]["pid"] == os.getpid()
    assert resolve(outside)[1] is None
    assert resolve(999999999) is None


# ---- the service the runtime wires (real thread, real clock, fake NVML chosen by environment)


def test_service_end_to_end_with_fake_nvml_from_env(tree, tmp_path, monkeypatch):
    from agenttrace.gpu.service import FAKE_ENV, GpuService

    from harness import own_gpu_burner

    fixture, burner = own_gpu_burner(tmp_path)
    monkeypatch.setenv(FAKE_ENV, str(fixture))
    p = tree._trees[0].spawn(tree.agent, [str(burner), "1000"])
    tree.procs.append(p)
    notices = []
    svc = GpuService(GpuConfig(interval_s=0.05, thresholds={"sm_util_pct": 90}),
                     ProcfsResolver([str(tree.watched)]), notice=lambda c, m: notices.append(c), node="n")
    svc.start()
    try:
        got = []
        deadline = time.monotonic() + 60  # generous: only a hung sampler would take this long
        while time.monotonic() < deadline and not any(e.record["gpu"]["change"] == "threshold" for e in got):
            got += svc.poll()
            time.sleep(0.02)
        assert [(e.pid, e.record["gpu"]["change"]) for e in got] == [(p.pid, "acquired"), (p.pid, "threshold")]
        assert got[0].record["agent"]["id"] == "a1" and got[0].record["proc"]["comm"] == burner.name
        assert got[1].record["gpu"]["threshold"]["metric"] == "sm_util_pct"
        assert svc.summary(p.pid)["sm_util_pct"] == 98
        assert notices == []
    finally:
        svc.stop()


def test_service_without_gpu_notices_once(monkeypatch):
    from agenttrace.gpu.service import FAKE_ENV, GpuService

    monkeypatch.setenv(FAKE_ENV, str(FIX / "gpu_unavailable.yaml"))
    notices = []
    svc = GpuService(None, lambda pid: None, notice=lambda c, m: notices.append(m))
    svc.start()
    svc.sampler._thread.join(10)
    svc.stop()
    assert notices == ["GPU enrichment off: NVIDIA kernel driver is not loaded (nvidia module missing)"]
    assert svc.poll() == [] and svc.summary(1) is None


def test_service_probe_flags_from_proc_devices(tmp_path):
    from agenttrace.gpu.service import GpuService

    f = tmp_path / "devices"
    f.write_text("Character devices:\n195 nvidia\n237 nvidia-caps\n511 nvidia-uvm\n\nBlock devices:\n")
    svc = GpuService(None, lambda pid: None, backend=FakeBackend(FIX / "gpu_unavailable.yaml"))
    assert svc.probe_cflags(str(f)) == ["-DAT_NVIDIA_UVM_MAJOR=511"]
    assert svc.device_names(str(f)) == {195: "nvidia", 237: "nvidia-caps", 511: "nvidia-uvm"}
    f.write_text("Character devices:\n  1 mem\n\nBlock devices:\n")
    assert svc.probe_cflags(str(f)) == ["-DAT_NVIDIA_UVM_MAJOR=0"]


def test_backend_init_crash_is_unavailable_not_fatal():
    class Broken(FakeBackend):
        def init(self):
            raise RuntimeError("libnvidia-ml.so.1: undefined symbol nvmlFoo")

    notices = []
    s = GpuSampler(Broken(FIX / "gpu_errors.yaml"), 1.0, notice=lambda c, m: notices.append((c, m)))
    assert s.open() is False
    assert notices == [("gpu_unavailable", "GPU enrichment off: RuntimeError: libnvidia-ml.so.1: undefined symbol nvmlFoo")]


def test_gpu_records_match_the_event_schema(tree):
    import json

    import jsonschema

    from agenttrace.paths import schema_dir

    validator = jsonschema.Draft202012Validator(json.loads((schema_dir() / "event.schema.json").read_text()))
    cfg = GpuConfig(thresholds={"memory_mib": 4000, "sm_util_pct": 90, "sustain_s": 8},
                    groups=[{"agents": ["a*"], "memory_quota_mib": 3000}])
    clock, backend, sampler, tracker, notices, worker, trainer = _setup(tree, "gpu_two_holders.yaml", cfg)
    now = [0.0]
    recs = []
    for t_s in (0, 5, 10, 20, 25, 30):
        recs += [e.record for e in _step(clock, sampler, tracker, t_s, now)]
    assert {r["gpu"]["change"] for r in recs} == {"acquired", "threshold", "released"}
    assert any(r["agent"] is None for r in recs) and any(r["agent"] for r in recs)
    for r in recs:
        errors = [e.message for e in validator.iter_errors(json.loads(json.dumps(r)))]
        assert errors == [], (r, errors)
    dev = {"ts": recs[0]["ts"], "kind": "device", "node": "n", "agent": next(r["agent"] for r in recs if r["agent"]),
           "proc": recs[0]["proc"], "device": device_body(195, 0, 6, 2, 1, {195: "nvidia"})}
    assert [e.message for e in validator.iter_errors(dev)] == []
