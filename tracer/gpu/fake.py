"""A fake NVML behind the same `GpuBackend` interface, replaying a YAML fixture.

Machines without a GPU (CI, these build hosts) still exercise attribution, thresholds,
quotas and error handling end to end: real processes in real agent cgroups stand in as the
GPU holders, and the fixture says what NVML would report about them over time.

Fixture format::

    gpus:
      - {index: 0, uuid: GPU-0f0e..., name: NVIDIA H100 80GB HBM3, memory_total_mib: 81559}
    process_utilization: true      # false: the driver reports no per-process SM/memory use
    timeline:                      # each step is the whole state from `at` (seconds) on
      - at: 0
        devices: {0: {sm: 3, mem: 1}}
        procs:
          - {pid: trainer, gpu: 0, memory_mib: 30000, sm: 90, mem: 40}   # kind: compute (default) | graphics
      - at: 10
        error: Unknown             # every call raises pynvml.NVMLError_Unknown until the next step
      - at: 12
        error: {code: GpuIsLost, calls: [processes]}   # only these calls fail
      - at: 20
        procs: []

`pid` is a number, a symbolic name bound at run time with `bind(name, pid)` (so a test can
put the pid of a process it just started into the fixture), `comm:NAME` (every process whose
comm is NAME when the fake is asked) or `cgroup:/path` (every process in that cgroup subtree,
relative to the cgroup2 mount). The last two let an end-to-end run (`AGENTTRACE_FAKE_NVML`)
make its own workload a GPU holder without knowing pids in advance. Time is measured on the clock
given (a FakeClock in tests) from `init()`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agenttrace.clock import Clock, SystemClock
from agenttrace.gpu.backend import GpuDevice, GpuProcess, GpuUnavailable

CALLS = ("devices", "processes", "utilization", "process_utilization")


class FixtureError(ValueError):
    """A fixture that does not validate; the message names file, line and field."""


class _Gpu(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    uuid: str = Field(min_length=1)
    name: str = "NVIDIA Fake GPU"
    memory_total_mib: Optional[int] = Field(81920, ge=0)


class _Proc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pid: Union[int, str]
    gpu: int = Field(ge=0)
    memory_mib: Optional[int] = Field(None, ge=0)
    sm: Optional[int] = Field(None, ge=0, le=100)
    mem: Optional[int] = Field(None, ge=0, le=100)
    kind: str = "compute"

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        if v not in ("compute", "graphics"):
            raise ValueError("kind must be 'compute' or 'graphics'")
        return v


class _DevUtil(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sm: Optional[int] = Field(None, ge=0, le=100)
    mem: Optional[int] = Field(None, ge=0, le=100)


class _Error(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    calls: List[str] = Field(default_factory=lambda: list(CALLS))

    @field_validator("code")
    @classmethod
    def _code(cls, v):
        _error_class(v)  # raises ValueError naming the known codes
        return v

    @field_validator("calls")
    @classmethod
    def _calls(cls, v):
        for c in v:
            if c not in CALLS:
                raise ValueError(f"unknown call '{c}' (known: {', '.join(CALLS)})")
        return v


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: float = Field(ge=0)
    devices: Dict[int, _DevUtil] = Field(default_factory=dict)
    procs: List[_Proc] = Field(default_factory=list)
    error: Optional[Union[str, _Error]] = None

    @field_validator("error")
    @classmethod
    def _error(cls, v):
        return _Error(code=v) if isinstance(v, str) else v


class _Fixture(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: List[_Gpu] = Field(min_length=1)
    process_utilization: bool = True
    init_error: Optional[str] = Field(None, description="init() raises GpuUnavailable with this reason")
    timeline: List[_Step] = Field(default_factory=list)

    @field_validator("timeline")
    @classmethod
    def _ordered(cls, v):
        for a, b in zip(v, v[1:]):
            if b.at < a.at:
                raise ValueError(f"timeline steps must be in time order ({b.at} comes after {a.at})")
        return v


def _error_class(code: str):
    import pynvml  # noqa: PLC0415 - the errors the real backend would see

    cls = getattr(pynvml, f"NVMLError_{code}", None)
    if not (isinstance(cls, type) and issubclass(cls, pynvml.NVMLError)):
        known = sorted(n[len("NVMLError_"):] for n in dir(pynvml) if n.startswith("NVMLError_"))
        raise ValueError(f"unknown NVML error '{code}' (known: {', '.join(known)})")
    return cls


def _compose_lines(text: str, source: str):
    """YAML → (data, {path tuple: line}) so validation errors can name the line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise FixtureError(f"{source}: invalid YAML: {e}") from None
    lines: Dict[Tuple, int] = {}

    def walk(n, path):
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value
                if k.tag.endswith(":int"):
                    try:
                        key = int(key)
                    except ValueError:
                        pass
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return yaml.safe_load(text), lines


def load_fixture(path: Union[str, Path]) -> _Fixture:
    p = Path(path)
    return parse_fixture(p.read_text(), str(p))


def parse_fixture(text: str, source: str = "<fixture>") -> _Fixture:
    data, lines = _compose_lines(text, source)
    try:
        return _Fixture.model_validate(data if data is not None else {})
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x in ("str", "_Error", "int")))
            line = None
            for n in range(len(loc), -1, -1):
                line = lines.get(loc[:n])
                if line is not None:
                    break
            where = ".".join(str(x) for x in loc) or "(top)"
            msgs.append(f"{source}:{line or 1}: {where}: {err['msg']}")
        raise FixtureError("\n".join(msgs)) from None


class FakeBackend:
    """`GpuBackend` replaying a fixture on a clock."""

    def __init__(self, fixture: Union[str, Path, _Fixture], clock: Optional[Clock] = None,
                 pids: Optional[Mapping[str, int]] = None):
        self.fixture = fixture if isinstance(fixture, _Fixture) else load_fixture(fixture)
        self.clock = clock or SystemClock()
        self._pids: Dict[str, int] = dict(pids or {})
        self._t0: Optional[int] = None
        self.calls: Dict[str, int] = {c: 0 for c in CALLS}  # how often each call was made

    def bind(self, name: str, pid: int) -> None:
        self._pids[name] = pid

    def init(self) -> None:
        if self.fixture.init_error:
            raise GpuUnavailable(self.fixture.init_error)
        self._t0 = self.clock.monotonic_ns()

    def shutdown(self) -> None:
        self._t0 = None

    def _step(self, call: str) -> Optional[_Step]:
        if self._t0 is None:
            import pynvml  # noqa: PLC0415

            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.calls[call] += 1
        t = (self.clock.monotonic_ns() - self._t0) / 1e9
        cur = None
        for s in self.fixture.timeline:
            if s.at <= t:
                cur = s
            else:
                break
        if cur is not None and cur.error is not None and call in cur.error.calls:
            raise _error_class(cur.error.code)()
        return cur

    def _pids_of(self, p: Union[int, str]) -> List[int]:
        if isinstance(p, int):
            return [p]
        if p.startswith("comm:"):
            return _pids_with_comm(p[5:])
        if p.startswith("cgroup:"):
            return _pids_in_cgroup(p[7:])
        try:
            return [self._pids[p]]
        except KeyError:
            raise KeyError(f"fixture pid '{p}' is not bound (FakeBackend.bind('{p}', pid))") from None

    def devices(self) -> List[GpuDevice]:
        self._step("devices")
        return [GpuDevice(g.index, g.uuid, g.name, g.memory_total_mib) for g in self.fixture.gpus]

    def processes(self, index: int) -> List[GpuProcess]:
        s = self._step("processes")
        if s is None:
            return []
        return [GpuProcess(pid, p.memory_mib, p.kind) for p in s.procs if p.gpu == index for pid in self._pids_of(p.pid)]

    def utilization(self, index: int) -> Tuple[Optional[int], Optional[int]]:
        s = self._step("utilization")
        d = s.devices.get(index) if s is not None else None
        if d is not None:
            return (d.sm, d.mem)
        if s is None:
            return (0, 0)
        sms = [p.sm for p in s.procs if p.gpu == index and p.sm is not None]
        mems = [p.mem for p in s.procs if p.gpu == index and p.mem is not None]
        return (min(sum(sms), 100), min(sum(mems), 100))

    def process_utilization(self, index: int, since_us: int) -> Dict[int, Tuple[int, int]]:
        s = self._step("process_utilization")
        if s is None or not self.fixture.process_utilization:
            return {}
        return {pid: (p.sm or 0, p.mem or 0)
                for p in s.procs if p.gpu == index and (p.sm is not None or p.mem is not None)
                for pid in self._pids_of(p.pid)}


def _pids_with_comm(comm: str) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().rstrip("\n") == comm:
                        out.append(int(d))
            except OSError:
                continue
    return sorted(out)


def _pids_in_cgroup(rel: str) -> List[int]:
    from agenttrace.enrich.cgroups import cgroup2_mount  # noqa: PLC0415

    root = os.path.join(str(cgroup2_mount()), rel.lstrip("/"))
    out = []
    for dirpath, _dirs, _files in os.walk(root):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return sorted(set(out))
