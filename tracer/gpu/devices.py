"""The NVIDIA driver's character devices, from /proc/devices: what the device fence
(probes/device.c) is compiled for. Kept apart from gpu/service.py so the probe plan
(session/probeplan.py), which runs before anything else at a start, imports no pydantic."""
from __future__ import annotations

from typing import Dict, Optional

NVIDIA_MAJOR = 195  # /dev/nvidia0.., /dev/nvidiactl; fixed by the driver (Documentation/admin-guide/devices.txt)


def nvidia_majors(proc_devices: str = "/proc/devices") -> Dict[int, str]:
    """Every char major that belongs to the NVIDIA driver (nvidia, nvidia-uvm, nvidia-caps, ...)."""
    out = {NVIDIA_MAJOR: "nvidia"}
    try:
        with open(proc_devices) as f:
            text = f.read()
    except OSError:
        return out
    in_char = False
    for line in text.splitlines():
        s = line.strip()
        if s == "Character devices:":
            in_char = True
        elif s == "Block devices:":
            in_char = False
        elif in_char and s:
            num, _, name = s.partition(" ")
            if num.isdigit() and name.strip().startswith("nvidia"):
                out[int(num)] = name.strip()
    return out


def nvidia_uvm_major(proc_devices: str = "/proc/devices") -> Optional[int]:
    """The dynamic char major of nvidia-uvm, or None when the module is not loaded."""
    for major, name in nvidia_majors(proc_devices).items():
        if name == "nvidia-uvm":
            return major
    return None
