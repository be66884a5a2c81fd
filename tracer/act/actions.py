"""The act stage's hands: signal a process, kill or freeze an agent's cgroup — each verified.

Every function returns an `ActionResult` whose `outcome` is what was observed afterwards, not
what was attempted: `killed` only once the process has exited (pidfd readable) or the cgroup
reports `populated 0`; `frozen` only once `cgroup.events` says `frozen 1`. Anything else is
`reported` with the reason in `detail`.

Safety: a pid is only signalled when `/proc/<pid>/cgroup` puts it inside the agent's cgroup,
so a recycled pid belonging to something else on the node is never touched. Cgroup paths are
resolved under the cgroup2 mount and must not be its root.
"""
from __future__ import annotations

import os
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEFAULT_VERIFY_S = 2.0


@dataclass
class ActionResult:
    outcome: str          # killed | frozen | reported
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome != "reported"


def find_cgroup2_mount() -> Optional[str]:
    """The cgroup2 mount point (cgroups.cgroup2_mount), or None where there is none."""
    from agenttrace.enrich.cgroups import CgroupError, cgroup2_mount
    try:
        return str(cgroup2_mount())
    except CgroupError:
        return None


def _read(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def cgroup_events(cg: Path) -> dict:
    out = {}
    for line in _read(cg / "cgroup.events").splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


class Actions:
    """Kill/freeze operations against processes and cgroups under one cgroup2 mount."""

    def __init__(self, cgroup_root: Optional[str] = None, verify_s: float = DEFAULT_VERIFY_S):
        root = cgroup_root or find_cgroup2_mount()
        self.cgroup_root = Path(root) if root else None
        self.verify_s = verify_s

    # ------------------------------------------------------------------ helpers
    def cgroup_dir(self, rel: str) -> Path:
        """Absolute directory of an agent cgroup given relative to the mount ("/agents/a1")
        or as an absolute cgroupfs path. Refuses the mount root and paths escaping it."""
        if self.cgroup_root is None:
            raise OSError("no cgroup2 mount found")
        if not rel:
            raise ValueError("agent has no cgroup")
        p = Path(rel)
        root = self.cgroup_root.resolve()
        cand = p if p.is_absolute() and str(p).startswith(str(root) + "/") else root / rel.lstrip("/")
        cand = cand.resolve()
        if cand == root or root not in cand.parents:
            raise ValueError(f"refusing to act on cgroup {rel!r}: not below {root}")
        return cand

    def _in_cgroup(self, pid: int, rel: Optional[str]) -> bool:
        if not rel:
            return False
        try:
            text = _read(Path(f"/proc/{pid}/cgroup"))
        except OSError:
            return False
        want = "/" + rel.strip("/")
        if self.cgroup_root is not None and rel.startswith(str(self.cgroup_root)):
            want = "/" + rel[len(str(self.cgroup_root)):].strip("/")
        for line in text.splitlines():
            if line.startswith("0::"):
                cur = line[3:].strip()
                return cur == want or cur.startswith(want + "/")
        return False

    def _wait(self, cond, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                if cond():
                    return True
            except OSError:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # ------------------------------------------------------------------ actions
    def kill_pid(self, pid: int, agent_cgroup: Optional[str] = None, sig: int = signal.SIGKILL) -> ActionResult:
        """Signal `pid` through a pidfd and wait until it has exited.

        With `agent_cgroup` the process must be inside that cgroup (guards against pid reuse)."""
        if pid <= 1:
            return ActionResult("reported", f"refusing to signal pid {pid}")
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return ActionResult("reported", f"pid {pid} had already exited")
        except OSError as e:
            return ActionResult("reported", f"pidfd_open({pid}): {e.strerror}")
        try:
            # Checked after pidfd_open: from here the pid cannot be recycled under us.
            if agent_cgroup is not None and not self._in_cgroup(pid, agent_cgroup):
                return ActionResult("reported", f"pid {pid} is not in agent cgroup {agent_cgroup} (exited or reused)")
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                return ActionResult("reported", f"pid {pid} had already exited")
            except OSError as e:
                return ActionResult("reported", f"signal to pid {pid} failed: {e.strerror}")
            p = select.poll()
            p.register(fd, select.POLLIN)
            # A pidfd becomes readable when the process exits (zombie included).
            if p.poll(int(self.verify_s * 1000)):
                return ActionResult("killed", f"pid {pid} exited after signal {int(sig)}")
            return ActionResult("reported", f"pid {pid} still running {self.verify_s:g}s after signal {int(sig)}")
        finally:
            os.close(fd)

    def kill_cgroup(self, rel: str) -> ActionResult:
        """Write 1 to cgroup.kill and wait for the cgroup (and its children) to be empty."""
        try:
            cg = self.cgroup_dir(rel)
        except (OSError, ValueError) as e:
            return ActionResult("reported", str(e))
        try:
            with open(cg / "cgroup.kill", "w") as f:
                f.write("1")
        except OSError as e:
            return ActionResult("reported", f"cgroup.kill on {cg}: {e.strerror or e}")
        if self._wait(lambda: cgroup_events(cg).get("populated") == 0 and not _read(cg / "cgroup.procs").strip(),
                      self.verify_s):
            return ActionResult("killed", f"cgroup {rel} is empty")
        return ActionResult("reported", f"cgroup {rel} still populated {self.verify_s:g}s after cgroup.kill")

    def freeze_cgroup(self, rel: str, freeze: bool = True) -> ActionResult:
        """Write to cgroup.freeze and wait until cgroup.events reports the new state."""
        try:
            cg = self.cgroup_dir(rel)
        except (OSError, ValueError) as e:
            return ActionResult("reported", str(e))
        want = 1 if freeze else 0
        try:
            with open(cg / "cgroup.freeze", "w") as f:
                f.write(str(want))
        except OSError as e:
            return ActionResult("reported", f"cgroup.freeze on {cg}: {e.strerror or e}")
        if self._wait(lambda: cgroup_events(cg).get("frozen") == want, self.verify_s):
            return ActionResult("frozen" if freeze else "reported",
                                f"cgroup {rel} {'frozen' if freeze else 'thawed'}")
        return ActionResult("reported", f"cgroup {rel} not {'frozen' if freeze else 'thawed'} after {self.verify_s:g}s")
