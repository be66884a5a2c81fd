"""GPU awareness: who holds each GPU, how much of it, and which agent is behind it.

Pieces, each small and replaceable:

- `GpuBackend`: what the sampler asks of NVML. `NvmlBackend` is the real one (official
  `nvidia-ml-py`, `import pynvml`); `agenttrace.gpu.fake.FakeBackend` replays a YAML fixture.
- `GpuSampler`: a background thread that asks the backend at an interval and publishes an
  immutable `GpuSnapshot` by swapping one reference. The pipeline only ever reads
  `sampler.latest`, so a slow or failing NVML call cannot stall event processing.
- `GpuTracker`: turns successive snapshots into `gpu` events (acquired / released /
  threshold) attributed to processes and agents, and gives the `gpu` summary that every other
  event of a GPU-holding process carries.
- `GpuConfig`: the pydantic model of the `gpu:` section of the config (policy per agent group,
  allowed trainers, quotas, thresholds, sampling interval).
- `GpuFence`: fills the BPF maps of probes/device.c (NVIDIA majors, per-agent deny, enforce).
"""
from __future__ import annotations

import fnmatch
import os
import socket
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Dict, List, Literal, Mapping, Optional, Protocol, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agenttrace.enrich.cgroups import cgroup2_mount, pid_cgroup
from agenttrace.clock import Clock, SystemClock
from agenttrace.session.event import Event
from agenttrace.timefmt import format_ns

# the driver's char majors: a module of their own, which the probe plan reads at every start
# without importing this one (pydantic, ~0.17 s)
from agenttrace.gpu.devices import NVIDIA_MAJOR, nvidia_majors, nvidia_uvm_major  # noqa: E402,F401


# --------------------------------------------------------------------------------------------
# Backend interface


from agenttrace.gpu.backend import GpuBackend, GpuDevice, GpuProcess, GpuUnavailable  # noqa: E402,F401


def _mib(nbytes: Optional[int]) -> Optional[int]:
    if nbytes is None:
        return None
    return int(nbytes) // (1024 * 1024)


class NvmlBackend:
    """The real backend, on the official NVML binding.

    `nvml` can be handed a stand-in module for tests of the error handling; it defaults to
    `pynvml` from nvidia-ml-py.
    """

    def __init__(self, nvml=None):
        # the binding is imported by init(), on the sampler's thread after the session has
        # started: importing it here was 15-40 ms of every start (docs/STARTUP.md)
        self._nvml = nvml
        self._handles: Dict[int, object] = {}
        self._inited = False

    def _is(self, err: Exception, name: str) -> bool:
        cls = getattr(self._nvml, name, None)
        return isinstance(cls, type) and isinstance(err, cls)

    def init(self) -> None:
        if self._nvml is None:
            try:
                import pynvml  # noqa: PLC0415 - optional at import time of agenttrace
            except ImportError as e:  # the dependency is declared, but a broken env must still say why
                raise GpuUnavailable(f"the nvidia-ml-py package is not installed ({e})") from e
            self._nvml = pynvml
        n = self._nvml
        try:
            n.nvmlInit()
        except n.NVMLError as e:
            if self._is(e, "NVMLError_LibraryNotFound"):
                raise GpuUnavailable("NVIDIA driver library libnvidia-ml.so.1 not found "
                                     "(no NVIDIA driver installed on this machine)") from e
            if self._is(e, "NVMLError_DriverNotLoaded"):
                raise GpuUnavailable("NVIDIA kernel driver is not loaded (nvidia module missing)") from e
            if self._is(e, "NVMLError_NoPermission"):
                raise GpuUnavailable("no permission to use NVML (run as root)") from e
            raise GpuUnavailable(f"NVML failed to initialise: {e}") from e
        self._inited = True
        try:
            count = n.nvmlDeviceGetCount()
        except n.NVMLError as e:
            self.shutdown()
            raise GpuUnavailable(f"NVML cannot count devices: {e}") from e
        if count == 0:
            self.shutdown()
            raise GpuUnavailable("the NVIDIA driver reports no GPU")

    def shutdown(self) -> None:
        if self._inited:
            self._inited = False
            self._handles.clear()
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass  # shutting down a broken library must not raise out of cleanup

    def _handle(self, index: int):
        h = self._handles.get(index)
        if h is None:
            h = self._nvml.nvmlDeviceGetHandleByIndex(index)
            self._handles[index] = h
        return h

    @staticmethod
    def _text(v) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    def devices(self) -> List[GpuDevice]:
        n = self._nvml
        out = []
        count = n.nvmlDeviceGetCount()
        if count != len(self._handles):
            self._handles.clear()  # a GPU fell off the bus or came back: indexes may have moved
        for i in range(count):
            h = self._handle(i)
            try:
                total = _mib(n.nvmlDeviceGetMemoryInfo(h).total)
            except n.NVMLError_NotSupported:
                total = None
            out.append(GpuDevice(i, self._text(n.nvmlDeviceGetUUID(h)), self._text(n.nvmlDeviceGetName(h)), total))
        return out

    def processes(self, index: int) -> List[GpuProcess]:
        n = self._nvml
        h = self._handle(index)
        out = []
        for kind, fn in (("compute", n.nvmlDeviceGetComputeRunningProcesses),
                         ("graphics", n.nvmlDeviceGetGraphicsRunningProcesses)):
            try:
                procs = fn(h)
            except n.NVMLError_NotSupported:
                continue
            for p in procs:
                out.append(GpuProcess(int(p.pid), _mib(getattr(p, "usedGpuMemory", None)), kind))
        return out

    def utilization(self, index: int) -> Tuple[Optional[int], Optional[int]]:
        n = self._nvml
        try:
            u = n.nvmlDeviceGetUtilizationRates(self._handle(index))
        except n.NVMLError_NotSupported:
            return (None, None)
        return (int(u.gpu), int(u.memory))

    def process_utilization(self, index: int, since_us: int) -> Dict[int, Tuple[int, int]]:
        n = self._nvml
        try:
            samples = n.nvmlDeviceGetProcessUtilization(self._handle(index), int(since_us))
        except (n.NVMLError_NotSupported, n.NVMLError_NotFound):
            # NotFound: no sample newer than since_us (an idle GPU), not a failure.
            return {}
        latest: Dict[int, Tuple[int, int, int]] = {}
        for s in samples:
            prev = latest.get(int(s.pid))
            if prev is None or s.timeStamp >= prev[0]:
                latest[int(s.pid)] = (int(s.timeStamp), int(s.smUtil), int(s.memUtil))
        return {pid: (sm, mem) for pid, (_, sm, mem) in latest.items()}


def nvml_status(backend: Optional[GpuBackend] = None) -> dict:
    """NVML/driver state for `agenttrace doctor`: {"available", "detail", "reason" | "devices"}."""
    try:
        b = backend if backend is not None else NvmlBackend()
        b.init()
    except GpuUnavailable as e:
        return {"available": False, "reason": e.reason, "detail": e.reason}
    try:
        devs = b.devices()
        return {"available": True,
                "detail": f"{len(devs)} GPU(s): " + ", ".join(f"[{d.index}] {d.name}" for d in devs),
                "devices": [{"index": d.index, "uuid": d.uuid, "name": d.name,
                             "memory_total_mib": d.memory_total_mib} for d in devs]}
    except Exception as e:  # noqa: BLE001 - doctor reports whatever NVML says
        reason = f"NVML error while listing GPUs: {e}"
        return {"available": False, "reason": reason, "detail": reason}
    finally:
        b.shutdown()


# --------------------------------------------------------------------------------------------
# Snapshots and the sampler


@dataclass(frozen=True)
class GpuUse:
    """One process's use of one GPU in one sample."""
    pid: int
    index: int
    used_memory_mib: Optional[int]
    sm_util_pct: Optional[int]
    mem_util_pct: Optional[int]
    kind: str


@dataclass(frozen=True)
class GpuState:
    device: GpuDevice
    sm_util_pct: Optional[int]
    mem_util_pct: Optional[int]
    uses: Tuple[GpuUse, ...]


@dataclass(frozen=True)
class GpuSnapshot:
    seq: int
    mono_ns: int
    wall_ns: int
    gpus: Tuple[GpuState, ...]
    by_pid: Mapping[int, Tuple[GpuUse, ...]] = field(default_factory=lambda: MappingProxyType({}))

    def device(self, index: int) -> Optional[GpuDevice]:
        for g in self.gpus:
            if g.device.index == index:
                return g.device
        return None


Notice = Callable[[str, str], None]
"""notice(code, message); code is "gpu_unavailable", "gpu_error" or "gpu_recovered"."""


class GpuSampler:
    """Samples a backend off the hot path; readers take `latest` (one reference read).

    Failure policy: the first failing sample sends one `gpu_error` notice; later attempts back
    off (interval doubled per failure up to `max_backoff_s`) and stay quiet; the first good
    sample after that sends `gpu_recovered`. A backend that cannot start sends
    `gpu_unavailable` once and the sampler stays off.
    """

    def __init__(self, backend: GpuBackend, interval_s: float = 2.0, *, clock: Optional[Clock] = None,
                 notice: Optional[Notice] = None, max_backoff_s: float = 60.0):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.backend = backend
        self.interval_s = float(interval_s)
        self.max_backoff_s = max(float(max_backoff_s), self.interval_s)
        self.clock = clock or SystemClock()
        self._notice = notice or (lambda code, msg: None)
        self.latest: Optional[GpuSnapshot] = None
        self.available: Optional[bool] = None  # None until init was tried
        self.unavailable_reason: Optional[str] = None
        self.failing = False
        self.errors = 0          # failed samples in total, for lifecycle stats
        self._consecutive = 0
        self._next_due_ns = 0
        self._seq = 0
        self._since_us: Dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle

    def open(self) -> bool:
        """Initialise the backend; False (after one notice) when no GPU can be sampled."""
        try:
            self.backend.init()
        except Exception as e:  # noqa: BLE001 - whatever stops NVML from starting turns GPU enrichment off, not the tracer
            reason = e.reason if isinstance(e, GpuUnavailable) else f"{type(e).__name__}: {e}"
            self.available = False
            self.unavailable_reason = reason
            self._notice("gpu_unavailable", f"GPU enrichment off: {reason}")
            return False
        self.available = True
        return True

    def start(self) -> None:
        """Open the backend and sample in a daemon thread (init too, so a slow driver never delays startup)."""
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="agenttrace-gpu", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None:
            t.join(timeout_s)
            if t.is_alive():
                return  # stuck inside an NVML call: shutting NVML down under it could crash the process
        if self.available:
            self.backend.shutdown()
            self.available = None

    def _run(self) -> None:
        if not self.open():
            return
        while not self._stop.is_set():
            self.tick()
            wait_ns = max(self._next_due_ns - self.clock.monotonic_ns(), 0)
            # Waits in real time; with a FakeClock tests call tick()/sample_once() themselves.
            self._stop.wait(min(max(wait_ns / 1e9, 0.01), self.max_backoff_s))

    # -- sampling

    def tick(self) -> bool:
        """Sample if one is due by the clock (interval, or back-off after failures)."""
        if self.clock.monotonic_ns() < self._next_due_ns:
            return False
        self.sample_once()
        return True

    def sample_once(self) -> Optional[GpuSnapshot]:
        """Take one sample now; returns the published snapshot, or None when it failed."""
        now = self.clock.monotonic_ns()
        try:
            snap = self._collect(now, self.clock.wall_ns())
        except GpuUnavailable as e:
            self._failed(now, e.reason)
            return None
        except Exception as e:  # noqa: BLE001 - any NVML (or driver) failure must not kill the sampler
            self._failed(now, f"{type(e).__name__}: {e}")
            return None
        self.latest = snap  # one reference store: readers see the old or the new snapshot, whole
        if self.failing:
            self.failing = False
            self._notice("gpu_recovered", "GPU sampling resumed")
        self._consecutive = 0
        self._next_due_ns = now + int(self.interval_s * 1e9)
        return snap

    def _failed(self, now: int, reason: str) -> None:
        self.errors += 1
        self._consecutive += 1
        if not self.failing:
            self.failing = True
            self._notice("gpu_error", f"GPU sampling failed, backing off: {reason}")
        backoff = min(self.interval_s * (2 ** self._consecutive), self.max_backoff_s)
        self._next_due_ns = now + int(backoff * 1e9)

    def _collect(self, mono_ns: int, wall_ns: int) -> GpuSnapshot:
        b = self.backend
        now_us = wall_ns // 1000
        gpus = []
        by_pid: Dict[int, List[GpuUse]] = {}
        for dev in b.devices():
            sm, mem = b.utilization(dev.index)
            since = self._since_us.get(dev.index, now_us - int(self.interval_s * 1e6))
            putil = b.process_utilization(dev.index, since)
            uses: Dict[int, GpuUse] = {}
            for p in b.processes(dev.index):
                u = putil.get(p.pid)
                prev = uses.get(p.pid)
                # A pid can be listed as compute and graphics: one use per (pid, GPU), larger memory.
                memv = p.used_memory_mib
                if prev is not None and prev.used_memory_mib is not None:
                    memv = prev.used_memory_mib if memv is None else max(memv, prev.used_memory_mib)
                kind = p.kind if prev is None or prev.kind == p.kind else "compute"
                uses[p.pid] = GpuUse(p.pid, dev.index, memv, u[0] if u else None, u[1] if u else None, kind)
            t = tuple(sorted(uses.values(), key=lambda x: x.pid))
            gpus.append(GpuState(dev, sm, mem, t))
            for use in t:
                by_pid.setdefault(use.pid, []).append(use)
        for dev in gpus:
            self._since_us[dev.device.index] = now_us
        self._seq += 1
        return GpuSnapshot(self._seq, mono_ns, wall_ns, tuple(gpus),
                           MappingProxyType({pid: tuple(v) for pid, v in by_pid.items()}))


# --------------------------------------------------------------------------------------------
# Configuration model (embedded by the config loader as the `gpu:` section)


class GpuThresholds(BaseModel):
    """Per process and GPU. An unset threshold is not checked."""
    model_config = ConfigDict(extra="forbid")

    memory_mib: Optional[int] = Field(None, ge=0, description="used GPU memory of one process on one GPU")
    sm_util_pct: Optional[int] = Field(None, ge=0, le=100, description="SM utilisation (%) of one process on one GPU")
    sustain_s: float = Field(0.0, ge=0, description="SM use must stay above sm_util_pct this long before it counts")


class GpuGroupPolicy(BaseModel):
    """GPU policy for the agents whose id or cgroup matches `agents` (fnmatch globs)."""
    model_config = ConfigDict(extra="forbid")

    agents: List[str] = Field(default_factory=lambda: ["*"], min_length=1,
                              description="globs on agent id, or on its cgroup path when the glob starts with '/'")
    allowed: bool = Field(False, description="may these agents use GPUs at all")
    memory_quota_mib: Optional[int] = Field(None, ge=0, description="GPU memory of all the agent's processes on all GPUs")
    thresholds: Optional[GpuThresholds] = None

    def matches(self, agent: Mapping) -> bool:
        aid, cg = str(agent.get("id", "")), str(agent.get("cgroup", ""))
        for g in self.agents:
            if fnmatch.fnmatchcase(cg if g.startswith("/") else aid, g):
                return True
        return False


class GpuTrainer(BaseModel):
    """An allowed GPU user: a process whose exe and cgroup match may use the listed GPUs."""
    model_config = ConfigDict(extra="forbid")

    gpus: List[Union[int, str]] = Field(default_factory=lambda: ["*"], min_length=1,
                                        description="GPU index, UUID, or '*'")
    exe: List[str] = Field(default_factory=list, description="globs on the process's exe path")
    cgroup: List[str] = Field(default_factory=list, description="globs on the process's cgroup path (relative to the cgroup2 mount)")

    @model_validator(mode="after")
    def _something_to_match(self):
        if not self.exe and not self.cgroup:
            raise ValueError("a trainer needs at least one of 'exe' or 'cgroup'")
        return self

    def covers_gpu(self, index: int, uuid: str) -> bool:
        for g in self.gpus:
            if g == "*" or g == index or (isinstance(g, str) and (g == uuid or g == str(index))):
                return True
        return False

    def matches(self, exe: str, cgroup: str) -> bool:
        ok_exe = not self.exe or any(fnmatch.fnmatchcase(exe or "", p) for p in self.exe)
        ok_cg = not self.cgroup or any(fnmatch.fnmatchcase(cgroup or "", p) for p in self.cgroup)
        return ok_exe and ok_cg


class GpuConfig(BaseModel):
    """The `gpu:` section of the agenttrace config."""
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    interval_s: float = Field(2.0, gt=0, le=3600, description="NVML sampling interval")
    max_backoff_s: float = Field(60.0, gt=0, description="longest wait between retries while NVML fails")
    thresholds: GpuThresholds = Field(default_factory=lambda: GpuThresholds(memory_mib=None, sm_util_pct=80, sustain_s=30))
    default: GpuGroupPolicy = Field(default_factory=lambda: GpuGroupPolicy(allowed=False),
                                    description="policy of agents no group matches")
    groups: List[GpuGroupPolicy] = Field(default_factory=list, description="first match wins")
    trainers: List[GpuTrainer] = Field(default_factory=list,
                                       description="allowed GPU users; empty = no trainer check")
    fence: Literal["follow-mode", "monitor", "off"] = Field(
        "follow-mode", description="kernel device fence: deny in enforce mode, only report, or not attached")
    extra_device_majors: List[int] = Field(default_factory=list,
                                           description="more char majors to treat as GPU devices (e.g. nvidia-caps)")

    @field_validator("extra_device_majors")
    @classmethod
    def _majors(cls, v):
        for m in v:
            if not 0 < m < 4096:
                raise ValueError(f"device major {m} out of range 1..4095")
        return v

    def policy_for(self, agent: Optional[Mapping]) -> Optional[GpuGroupPolicy]:
        if agent is None:
            return None
        for g in self.groups:
            if g.matches(agent):
                return g
        return self.default

    def thresholds_for(self, agent: Optional[Mapping]) -> GpuThresholds:
        pol = self.policy_for(agent)
        return pol.thresholds if pol is not None and pol.thresholds is not None else self.thresholds

    def trainer_ok(self, index: int, uuid: str, exe: str, cgroup: str) -> Optional[bool]:
        """True/False whether a process is an allowed trainer of this GPU; None when no trainers are configured."""
        relevant = [t for t in self.trainers if t.covers_gpu(index, uuid)]
        if not self.trainers:
            return None
        return any(t.matches(exe, cgroup) for t in relevant)


# --------------------------------------------------------------------------------------------
# Attribution


Resolver = Callable[[int], Optional[Tuple[dict, Optional[dict]]]]
"""resolve(pid) -> (proc dict of the record contract (tracer/schema/event.schema.json), agent dict or None); None when the pid is unknown."""


@dataclass
class _Holding:
    proc: dict
    agent: Optional[dict]
    cgroup: str
    use: GpuUse
    above: Dict[str, bool] = field(default_factory=dict)
    sm_above_since_ns: Optional[int] = None


class GpuTracker:
    """Turns snapshots into `gpu` events and answers "what GPU does this pid hold".

    Runs on the pipeline thread only. `update()` is idempotent per snapshot (same seq → no events).
    """

    def __init__(self, resolve: Resolver, config: Optional[GpuConfig] = None, node: Optional[str] = None,
                 cgroup_of: Optional[Callable[[int], str]] = None):
        self.resolve = resolve
        self.config = config or GpuConfig()
        self.node = node or socket.gethostname()
        self._cgroup_of = cgroup_of or _proc_cgroup_path
        self._held: Dict[Tuple[int, int], _Holding] = {}
        self._agent_over: Dict[int, bool] = {}  # agent cgroup id -> above quota
        self._last_seq = -1
        self._snap: Optional[GpuSnapshot] = None
        self._summaries: Dict[int, dict] = {}

    # -- queries used by the enrich stage

    def summary(self, pid: int) -> Optional[dict]:
        """The `gpu` summary for any event of `pid`, or None when it holds no GPU.

        Called for every event on the hot path: a dict lookup; the summaries are rebuilt once per
        new snapshot. The dict is shared by all events of the pid until then: read it, never edit it."""
        return self._summaries.get(pid)

    def _rebuild_summaries(self) -> None:
        per: Dict[int, List[_Holding]] = {}
        for (pid, _), h in self._held.items():
            per.setdefault(pid, []).append(h)
        out = {}
        for pid, items in per.items():
            items.sort(key=lambda h: h.use.index)
            devs = [self._gpu_body(h) for h in items]
            mems = [d["used_memory_mib"] for d in devs if d["used_memory_mib"] is not None]
            sms = [d["sm_util_pct"] for d in devs if d["sm_util_pct"] is not None]
            out[pid] = {"index": devs[0]["index"], "uuid": devs[0]["uuid"], "name": devs[0]["name"],
                        "used_memory_mib": sum(mems) if mems else None,
                        "sm_util_pct": max(sms) if sms else None,
                        "count": len(devs), "devices": devs}
        self._summaries = out

    def holders(self) -> List[Tuple[int, int]]:
        return sorted(self._held)

    # -- the update

    def update(self, snap: Optional[GpuSnapshot]) -> List[Event]:
        if snap is None or snap.seq == self._last_seq:
            return []
        self._last_seq = snap.seq
        self._snap = snap
        out: List[Event] = []
        seen = set()
        for g in snap.gpus:
            for use in g.uses:
                key = (use.pid, use.index)
                seen.add(key)
                h = self._held.get(key)
                if h is None:
                    h = self._new_holding(use)
                    self._held[key] = h
                    out.append(self._event(snap, h, "acquired"))
                else:
                    h.use = use
                out.extend(self._thresholds(snap, h))
        for key in [k for k in self._held if k not in seen]:
            h = self._held.pop(key)
            out.append(self._event(snap, h, "released"))
        out.extend(self._quotas(snap))
        self._rebuild_summaries()
        return out

    def _new_holding(self, use: GpuUse) -> _Holding:
        r = None
        try:
            r = self.resolve(use.pid)
        except Exception:  # noqa: BLE001 - an enricher failing never stops the pipeline (docs/ARCHITECTURE.md §3)
            r = None
        if r is None:
            proc, agent = {"pid": use.pid, "ppid": 0, "uid": None, "comm": "", "exe": "", "args": [], "ancestry": []}, None
        else:
            proc, agent = r
        return _Holding(proc=proc, agent=agent, cgroup=self._cgroup_of(use.pid), use=use)

    def _gpu_body(self, h: _Holding) -> dict:
        dev = self._snap.device(h.use.index) if self._snap else None
        return {"index": h.use.index,
                "uuid": dev.uuid if dev else "",
                "name": dev.name if dev else "",
                "used_memory_mib": h.use.used_memory_mib,
                "sm_util_pct": h.use.sm_util_pct,
                "mem_util_pct": h.use.mem_util_pct,
                "memory_total_mib": dev.memory_total_mib if dev else None,
                "kind": h.use.kind}

    def _event(self, snap: GpuSnapshot, h: _Holding, change: str, threshold: Optional[dict] = None) -> Event:
        body = self._gpu_body(h)
        body["change"] = change
        pol = self.config.policy_for(h.agent)
        body["allowed"] = None if pol is None else pol.allowed
        body["trainer"] = self.config.trainer_ok(h.use.index, body["uuid"], h.proc.get("exe") or "", h.cgroup)
        body["memory_quota_mib"] = None if pol is None else pol.memory_quota_mib
        body["agent_used_memory_mib"] = self._agent_memory(h.agent) if h.agent else None
        if threshold is not None:
            body["threshold"] = threshold
        record = {"ts": format_ns(snap.wall_ns), "kind": "gpu", "node": self.node,
                  "agent": h.agent, "proc": h.proc, "gpu": body}
        return Event("gpu", snap.wall_ns, record, pid=h.use.pid,
                     agent_cgroup_id=int(h.agent.get("cgroup_id") or 0) if h.agent else 0)

    def _thresholds(self, snap: GpuSnapshot, h: _Holding) -> List[Event]:
        th = self.config.thresholds_for(h.agent)
        out = []
        mem = h.use.used_memory_mib
        if th.memory_mib is not None and mem is not None:
            out.extend(self._cross(snap, h, "memory_mib", mem > th.memory_mib, th.memory_mib, mem))
        sm = h.use.sm_util_pct
        if th.sm_util_pct is not None and sm is not None:
            if sm > th.sm_util_pct:
                if h.sm_above_since_ns is None:
                    h.sm_above_since_ns = snap.mono_ns
                sustained = snap.mono_ns - h.sm_above_since_ns >= int(th.sustain_s * 1e9)
                if sustained:
                    out.extend(self._cross(snap, h, "sm_util_pct", True, th.sm_util_pct, sm,
                                           sustained_s=(snap.mono_ns - h.sm_above_since_ns) / 1e9))
            else:
                h.sm_above_since_ns = None
                out.extend(self._cross(snap, h, "sm_util_pct", False, th.sm_util_pct, sm))
        return out

    def _cross(self, snap, h: _Holding, metric: str, above: bool, limit, value, sustained_s=None) -> List[Event]:
        was = h.above.get(metric, False)
        if above == was:
            return []
        h.above[metric] = above
        t = {"metric": metric, "limit": limit, "value": value, "direction": "above" if above else "below"}
        if sustained_s is not None:
            t["sustained_s"] = sustained_s
        return [self._event(snap, h, "threshold", t)]

    def _agent_memory(self, agent: Mapping) -> int:
        cid = agent.get("cgroup_id")
        return sum(h.use.used_memory_mib or 0 for h in self._held.values()
                   if h.agent is not None and h.agent.get("cgroup_id") == cid)

    def _quotas(self, snap: GpuSnapshot) -> List[Event]:
        agents: Dict[int, List[_Holding]] = {}
        for h in self._held.values():
            if h.agent is not None:
                agents.setdefault(int(h.agent.get("cgroup_id") or 0), []).append(h)
        out = []
        for cid in list(self._agent_over):
            if cid not in agents:
                del self._agent_over[cid]  # the agent holds nothing any more; released events said so
        for cid, hs in agents.items():
            pol = self.config.policy_for(hs[0].agent)
            quota = pol.memory_quota_mib if pol is not None else None
            if quota is None:
                continue
            total = sum(h.use.used_memory_mib or 0 for h in hs)
            over = total > quota
            if over != self._agent_over.get(cid, False):
                self._agent_over[cid] = over
                # Attributed to the agent's largest holder: the process a responder will look at first.
                top = max(hs, key=lambda h: (h.use.used_memory_mib or 0, -h.use.pid))
                out.append(self._event(snap, top, "threshold",
                                       {"metric": "agent_memory_mib", "limit": quota, "value": total,
                                        "direction": "above" if over else "below"}))
        return out


class GpuEnricher:
    """The pipeline stage: injects `gpu` events as snapshots arrive and puts the GPU summary on
    every event of a GPU-holding process (`record["proc"]["gpu"]`, for kinds other than gpu).

    `poll()` is for the reader's idle path (ring-buffer poll timeout), so GPU changes of a quiet
    agent are still reported.
    """

    def __init__(self, sampler: GpuSampler, tracker: GpuTracker):
        self.sampler = sampler
        self.tracker = tracker

    def poll(self) -> List[Event]:
        return self.tracker.update(self.sampler.latest)

    def __call__(self, event: Event) -> List[Event]:
        out = self.poll()
        proc = event.record.get("proc")
        if event.kind != "gpu" and event.pid and isinstance(proc, dict):
            s = self.tracker.summary(event.pid)
            if s is not None:
                proc["gpu"] = s  # where enrich.Enricher puts it too: the process's, not the event's
        out.append(event)
        return out


# --------------------------------------------------------------------------------------------
# /proc fallback resolver (the proc table replaces it in the daemon; tests and the real check use it)


def _proc_cgroup_path(pid: int) -> str:
    return pid_cgroup(pid) or ""


def agent_cgroup_of(cgroup: str, watched: Sequence[str]) -> Optional[str]:
    """The agent cgroup (relative path) a cgroup belongs to: the watched cgroup's direct child on
    its path, or the watched cgroup itself (README, Using it); None outside every watched cgroup."""
    for w in watched:
        w = w.rstrip("/") or "/"
        if cgroup == w or cgroup.startswith(w.rstrip("/") + "/"):
            rest = cgroup[len(w.rstrip("/")):].strip("/")
            return w.rstrip("/") + "/" + rest.split("/")[0] if rest else w
    return None


def table_resolver(procs, agents) -> Resolver:
    """resolve(pid) on the daemon's process table (`proctable.ProcTable`) and agent identities
    (`cgroups.AgentResolver`). GPU holders are often processes that started before agenttrace
    or live outside agent cgroups, so the agent comes from the pid's cgroup, not from events."""
    from agenttrace.enrich.cgroups import relpath  # noqa: PLC0415

    def resolve(pid: int):
        p = procs.get(pid)
        if p is None:
            return None
        rec = p.record()
        rec["ancestry"] = procs.ancestry(pid)
        cg = pid_cgroup(pid)
        if cg is None:
            return rec, None
        by_rel = {relpath(path): cid for cid, path in agents.watched().items()}
        acg = agent_cgroup_of(cg, list(by_rel))
        if acg is None:
            return rec, None
        cid = by_rel.get(acg)
        if cid is None:
            try:
                cid = os.stat(str(cgroup2_mount()) + acg).st_ino
            except OSError:
                return rec, None
        return rec, agents.agent(cid)

    return resolve


def _read_stat(pid: int) -> Tuple[str, int]:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # comm may hold spaces and parentheses: it runs from the first '(' to the last ')'.
    lp, rp = s.index("("), s.rindex(")")
    return s[lp + 1:rp], int(s[rp + 2:].split()[1])


class ProcfsResolver:
    """resolve(pid) from /proc; agents are the direct children of the watched cgroups (README, Using it)."""

    def __init__(self, watched: Sequence[str], mount: Optional[str] = None, max_ancestry: int = 8):
        self.mount = str(mount or cgroup2_mount())
        self.watched = [self._rel(w) for w in watched]
        self.max_ancestry = max_ancestry

    def _rel(self, path: str) -> str:
        p = os.path.normpath(path)
        if p == self.mount or p.startswith(self.mount.rstrip("/") + "/"):
            p = p[len(self.mount.rstrip("/")):] or "/"
        return p if p.startswith("/") else "/" + p

    def agent_of(self, cgroup: str) -> Optional[dict]:
        acg = agent_cgroup_of(cgroup, self.watched)
        if acg is None:
            return None
        try:
            cid = os.stat(self.mount.rstrip("/") + acg).st_ino
        except OSError:
            return None
        return {"id": os.path.basename(acg) or acg, "cgroup": acg, "cgroup_id": cid}

    def _one(self, pid: int) -> dict:
        comm, ppid = _read_stat(pid)
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = ""
        return {"pid": pid, "ppid": ppid, "comm": comm, "exe": exe}

    def __call__(self, pid: int) -> Optional[Tuple[dict, Optional[dict]]]:
        try:
            me = self._one(pid)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
            uid = os.stat(f"/proc/{pid}").st_uid
        except (OSError, ValueError):
            return None
        ancestry = []
        p = me["ppid"]
        while p > 0 and len(ancestry) < self.max_ancestry:
            try:
                a = self._one(p)
            except (OSError, ValueError):
                break
            ancestry.append({"pid": a["pid"], "comm": a["comm"], "exe": a["exe"]})
            p = a["ppid"]
        proc = {"pid": pid, "ppid": me["ppid"], "uid": uid, "comm": me["comm"], "exe": me["exe"],
                "args": args, "ancestry": ancestry}
        return proc, self.agent_of(_proc_cgroup_path(pid))


# --------------------------------------------------------------------------------------------
# Kernel device fence (probes/device.c maps)


_ACCESS = ((2, "r"), (4, "w"), (1, "m"))  # BPF_DEVCG_ACC_READ/WRITE/MKNOD, in cgroup v1 "rwm" notation


def device_body(major: int, minor: int, access: int, dev_type: int, verdict: int,
                names: Optional[Mapping[int, str]] = None) -> dict:
    """The `device` body of the record contract (tracer/schema/event.schema.json) from an `at_device` record (for the decoder)."""
    return {"major": major, "minor": minor,
            "access": "".join(n for bit, n in _ACCESS if access & bit),
            "type": {1: "block", 2: "char"}.get(dev_type, str(dev_type)),
            "name": (names or {}).get(major, ""),
            "verdict": "blocked" if verdict else "allowed"}


class GpuFence:
    """Fills the maps of probes/device.c (`gpu_dev_majors`, `gpu_policy`) and its two switches
    in the shared `at_config` map: AT_CFG_GPU_FENCE (1: the fence denies in enforce mode — the
    mode itself is AT_CFG_ENFORCE, written with every other enforce switch by Tracer.set_mode)
    and AT_CFG_GPU_DEFAULT (verdict for agents with no `gpu_policy` entry yet, 1 = deny, so a new
    agent cgroup is fenced from its first open, before userspace has seen it)."""

    def __init__(self, bpf, config: GpuConfig, mode: str):
        self.bpf = bpf
        self.config = config
        self.mode = mode

    @staticmethod
    def _put(table, key: int, value: int) -> None:
        table[table.Key(key)] = table.Leaf(value)

    def install(self, majors: Sequence[int] = ()) -> None:
        """Set the GPU majors beyond 195 and the uvm major compiled in, and the enforce flags."""
        m = self.bpf["gpu_dev_majors"]
        for major in set(majors) | set(self.config.extra_device_majors):
            self._put(m, major, 1)
        from agenttrace.kernel.wire import AT_CFG_GPU_DEFAULT, AT_CFG_GPU_FENCE
        e = self.bpf["at_config"]
        self._put(e, AT_CFG_GPU_FENCE, 1 if self.config.fence == "follow-mode" else 0)
        self._put(e, AT_CFG_GPU_DEFAULT, 0 if self.config.default.allowed else 1)

    def set_agent(self, agent: Mapping) -> None:
        """Record an agent's policy (call when an agent cgroup is first seen or config reloads)."""
        pol = self.config.policy_for(agent)
        self._put(self.bpf["gpu_policy"], int(agent["cgroup_id"]), 0 if pol.allowed else 1)

    def forget_agent(self, cgroup_id: int) -> None:
        t = self.bpf["gpu_policy"]
        try:
            del t[t.Key(int(cgroup_id))]
        except KeyError:
            pass


# --------------------------------------------------------------------------------------------
# One object for the daemon / run / tail wiring

FAKE_ENV = "AGENTTRACE_FAKE_NVML"
"""Path of a gpu_fake fixture: use the fake backend instead of NVML (end-to-end tests, demos)."""


def default_backend(clock: Optional[Clock] = None) -> GpuBackend:
    fixture = os.environ.get(FAKE_ENV)
    if fixture:
        from agenttrace.gpu.fake import FakeBackend  # noqa: PLC0415

        return FakeBackend(fixture, clock)
    return NvmlBackend()


class _NoBackend:
    """Stands in when even the NVML binding cannot be imported: init says why."""

    def __init__(self, reason: str):
        self.reason = reason

    def init(self) -> None:
        raise GpuUnavailable(self.reason)

    def shutdown(self) -> None:
        pass


class GpuService:
    """Sampler + tracker + fence behind the calls the runtime makes.

        gpu = GpuService(config.gpu, table_resolver(procs, agents), mode=mode, notice=lifecycle_notice)
        probes = Probes(features + ("device",), extra_cflags=gpu.probe_cflags())   # unless config.fence == "off"
        gpu.install_fence(probes); gpu.agent_seen(agent) for each agent (new ones too)
        gpu.start()
        ... reader idle path: events += gpu.poll(); Enricher(gpu_summary=gpu.summary)
        gpu.stop()
    """

    def __init__(self, config: Optional[GpuConfig], resolve: Resolver, *, mode: str = "monitor",
                 notice: Optional[Notice] = None, backend: Optional[GpuBackend] = None,
                 clock: Optional[Clock] = None, node: Optional[str] = None):
        self.config = config or GpuConfig()
        self.mode = mode
        if backend is None:
            try:
                backend = default_backend(clock)
            except GpuUnavailable as e:
                backend = _NoBackend(e.reason)
        self.sampler = GpuSampler(backend, self.config.interval_s, clock=clock, notice=notice,
                                  max_backoff_s=self.config.max_backoff_s)
        self.tracker = GpuTracker(resolve, self.config, node=node)
        self.fence: Optional[GpuFence] = None

    def start(self) -> None:
        if self.config.enabled:
            self.sampler.start()

    def stop(self) -> None:
        self.sampler.stop()

    def poll(self) -> List[Event]:
        """New `gpu` events since the last call (cheap when nothing changed: one reference compare)."""
        return self.tracker.update(self.sampler.latest)

    def summary(self, pid: int) -> Optional[dict]:
        return self.tracker.summary(pid)

    def probe_cflags(self, proc_devices: str = "/proc/devices") -> List[str]:
        return [f"-DAT_NVIDIA_UVM_MAJOR={nvidia_uvm_major(proc_devices) or 0}"]

    def device_names(self, proc_devices: str = "/proc/devices") -> Dict[int, str]:
        """major -> driver name, for the `device.name` of decoded device events."""
        return nvidia_majors(proc_devices)

    def install_fence(self, probes, proc_devices: str = "/proc/devices") -> GpuFence:
        self.fence = GpuFence(probes, self.config, self.mode)
        # nvidia-caps (MIG access) and any other nvidia* majors the driver registered.
        self.fence.install([m for m in nvidia_majors(proc_devices) if m != NVIDIA_MAJOR])
        return self.fence

    def agent_seen(self, agent: Mapping) -> None:
        if self.fence is not None:
            self.fence.set_agent(agent)

    def set_config(self, config: GpuConfig, agents: Sequence[Mapping] = ()) -> None:
        """A reloaded `gpu:` section: policy, thresholds, trainers and the fence's per-agent
        verdicts change live (the caller checked that sampler and fence stay as they are)."""
        self.config = config
        self.tracker.config = config
        self.sampler.interval_s = config.interval_s
        self.sampler.max_backoff_s = config.max_backoff_s
        if self.fence is not None:
            self.fence.config = config
            self.fence.install([m for m in nvidia_majors() if m != NVIDIA_MAJOR])
            for a in agents:
                self.fence.set_agent(a)

    def agent_gone(self, cgroup_id: int) -> None:
        if self.fence is not None:
            self.fence.forget_agent(cgroup_id)
