"""What the GPU sampler asks of NVML: the backend interface and the values it returns.

The real backend (`service.NvmlBackend`, official nvidia-ml-py) and the fake (`fake.FakeBackend`,
a YAML fixture, for machines with no GPU) both implement `GpuBackend`; this module holds only
the interface so that each of them depends on it and neither on the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

class GpuUnavailable(Exception):
    """No GPU enrichment is possible on this machine (no library, no driver, no device)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    memory_total_mib: Optional[int]


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_mib: Optional[int]  # None where the driver does not report it (e.g. no permission)
    kind: str  # "compute" | "graphics"


class GpuBackend(Protocol):
    def init(self) -> None:
        """Raise GpuUnavailable when there is nothing to sample."""

    def shutdown(self) -> None: ...

    def devices(self) -> List[GpuDevice]: ...

    def processes(self, index: int) -> List[GpuProcess]: ...

    def utilization(self, index: int) -> Tuple[Optional[int], Optional[int]]:
        """(sm_pct, mem_pct) of the whole device; None where not reported."""

    def process_utilization(self, index: int, since_us: int) -> Dict[int, Tuple[int, int]]:
        """pid -> (sm_pct, mem_pct) over samples newer than since_us; {} where not reported."""
