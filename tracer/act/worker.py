"""The act stage: userspace actions (kill, kill-agent, freeze-agent) on a worker thread of their own.

Why a worker: verifying a kill or a freeze takes up to `verify_s`; done on the ring-buffer
reader thread it stalled every other record behind it, and an agent could hide a connect behind
twenty kill-triggering execs. The reader only *decides* (engine) and enqueues; the worker
acts and verifies; the finished alert comes back through `done` and the reader writes it with
its final outcome. Other records never wait for it.

Honest outcomes:
- the pidfd is opened on the reader thread when the rule fires, and the process it names is
  checked to have started no later than the event: a recycled pid never gets our signal;
- a target that was already gone (or a zombie: its pidfd is readable before we signal) is
  `exited`, with its exit status when the exit record says it, and the rule whose kernel block
  made it give up when there was one;
- `kill` stops the target, then every live descendant (children from /proc, double-forked
  ones from the process table's creator chain), then kills them all: a tree that forked and
  daemonised (`sh -c 'ssh -f ...; sleep 100 &'` style) dies whole;
- a full queue is counted and reported (`reported`, "act queue full"), never dropped silently.
"""
from __future__ import annotations

import collections
import os
import queue
import select
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from agenttrace.act.actions import ActionResult, Actions
from agenttrace.kernel.wire import FORKF_EXITED

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# /proc starttime has clock-tick resolution (10 ms at 100 Hz): a descendant's /proc start and
# its fork time as the table saw it agree within two ticks
_START_SLACK_NS = 2 * 1_000_000_000 // CLK_TCK
# The target of an event began before it, and /proc rounds its start down to the tick: a start
# later than the event is a later process, whatever the tick. Only the clocks are allowed for:
# /proc counts CLOCK_BOOTTIME (suspended time included), events CLOCK_MONOTONIC, and an event's
# kernel time is rebuilt from its wall time with an offset re-read now and then.
_CLOCK_MARGIN_NS = 1_000_000


def _boot_minus_mono() -> int:
    try:
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    except (AttributeError, OSError):
        return 0


def proc_start_ns(pid: int) -> Optional[int]:
    """Start time of `pid` in ns since boot (/proc/PID/stat field 22), None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2:].split()
    try:
        return int(rest[19]) * 1_000_000_000 // CLK_TCK
    except (IndexError, ValueError):
        return None


def reuse_verdict(pid: int, ktime: int, fork_lookup: Optional[Callable] = None) -> Optional[str]:
    """Why the process holding `pid` now is not the one of an event at `ktime` (kernel ns), or
    None when it is (as far as can be told). Ask with a pidfd on `pid` already open: the answer
    is then about the process that pidfd pins (see ActJob.open_target)."""
    if not ktime:
        return None
    if fork_lookup is not None:
        try:
            ent = fork_lookup(pid)
        except Exception:
            ent = None
        if ent is not None and not ent[2] & FORKF_EXITED:
            if ent[1] > ktime:
                return "pid reused since, by a process forked in the agent"
            return None
        # no entry (forked outside scope, or exited after its exec) or one of an exited
        # process (maybe an earlier holder of the pid): /proc's start time is all there is
    start = proc_start_ns(pid)
    if start is not None and start > ktime + _boot_minus_mono() + _CLOCK_MARGIN_NS:
        return "pid reused since"
    return None


def _readable(fd: int, timeout_ms: int = 0) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout_ms))


@dataclass
class ActJob:
    action: str                      # kill | kill-agent | freeze-agent
    pid: int
    cgroup: Optional[str]
    ktime: int                       # the triggering event's kernel time (ns since boot)
    alert: object = None             # pipeline.Event of the alert, outcome filled in by the worker
    on_done: Optional[Callable[[str], None]] = None   # de-dup bookkeeping for suppressed repeats
    pidfd: int = -1
    result: Optional[ActionResult] = None
    descendants: list = field(default_factory=list)
    # why the target is gone (set at decision time): the worker then kills only what it forked
    gone: Optional[str] = None
    submitted: int = 0               # monotonic ns when handed to the worker

    def open_target(self, fork_lookup: Optional[Callable] = None) -> None:
        """On the reader thread, at decision time: pin the process before the pid can be reused.

        `fork_lookup` (kernel/forks.py KernelForks.lookup): pid -> (creator, fork ktime, flags)
        of the kernel's proc_forks entry. Read *after* the pidfd is open, an entry that is not
        marked exited tells who holds the pid now: forked no later than the event, it is the
        target, alive when the pidfd was taken (its exit would have released or marked the
        entry before the pid could go to anyone); forked after the event, the target is gone
        and a process forked in the agent took its pid. /proc's start time cannot tell that:
        it has clock-tick resolution, and an agent hands a pid on within a tick."""
        if self.action != "kill" or self.pid <= 1:
            return
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            self.gone = f"pid {self.pid} had already exited"
            return
        verdict = reuse_verdict(self.pid, self.ktime, fork_lookup)
        if verdict is not None:
            os.close(fd)
            self.gone = f"pid {self.pid} had already exited ({verdict})"
            return
        self.pidfd = fd

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class ActWorker:
    """One thread running ActJobs in order; finished jobs are collected from `done`."""

    def __init__(self, actions: Optional[Actions] = None, procs=None, maxsize: int = 1024):
        self.actions = actions or Actions()
        self.procs = procs               # ProcTable (read-only here), for double-forked descendants
        # () -> [(pid, creator, fork ktime)] from the kernel (kernel/forks.py): with fork
        # records off, fork-only descendants are there and not in the process table
        self.kernel_forks = None
        # pid -> (creator, fork ktime, flags) | None (KernelForks.lookup): who holds a pid now
        self.fork_lookup = None
        self._scan: Optional[tuple] = None     # (monotonic ns, kernel_forks()) see _live_forks
        self._q: "queue.Queue[Optional[ActJob]]" = queue.Queue(maxsize)
        self.done: "collections.deque[ActJob]" = collections.deque()
        self.queue_full = 0
        self.completed = 0
        self._thread: Optional[threading.Thread] = None
        self._idle = threading.Event()
        self._idle.set()
        self._inflight = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="agenttrace-act", daemon=True)
            self._thread.start()

    def submit(self, job: ActJob) -> None:
        if job.result is not None:         # decided on the reader thread
            self._finish(job)
            return
        job.submitted = time.monotonic_ns()
        with self._lock:
            self._inflight += 1
            self._idle.clear()
        try:
            self._q.put_nowait(job)
        except queue.Full:
            self.queue_full += 1
            job.result = (ActionResult("exited", f"{job.gone}; act queue full: what it forked was not looked for")
                          if job.gone is not None else
                          ActionResult("reported", "act queue full: too many actions pending"))
            self._finish(job)
            self._dec()

    def _dec(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight <= 0:
                self._inflight = 0
                self._idle.set()

    def wait_idle(self, timeout: float) -> bool:
        """Block until every submitted job is done (stop/drain paths, never the reader's poll)."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self.wait_idle(timeout)
            self._q.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _finish(self, job: ActJob) -> None:
        job.close()
        self.done.append(job)

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                job.result = self._run(job)
            except Exception as e:           # an action never kills the worker
                job.result = ActionResult("reported", f"{job.action} failed: {type(e).__name__}: {e}")
            self.completed += 1
            self._finish(job)
            self._dec()

    # ------------------------------------------------------------------ actions
    def _run(self, job: ActJob) -> ActionResult:
        if job.action == "kill-agent":
            if not job.cgroup:
                return ActionResult("reported", "event has no agent cgroup")
            return self.actions.kill_cgroup(job.cgroup)
        if job.action == "freeze-agent":
            if not job.cgroup:
                return ActionResult("reported", "event has no agent cgroup")
            return self.actions.freeze_cgroup(job.cgroup)
        if job.action == "kill":
            return self._kill_tree(job)
        return ActionResult("reported", f"unknown action {job.action}")

    def _kill_tree(self, job: ActJob) -> ActionResult:
        if job.gone is not None:
            return self._kill_left_behind(job)
        fd = job.pidfd
        if fd < 0:
            return ActionResult("reported", f"refusing to signal pid {job.pid}")
        if _readable(fd):
            job.gone = f"pid {job.pid} had already exited"
            return self._kill_left_behind(job)
        if job.cgroup is not None and not self.actions._in_cgroup(job.pid, job.cgroup):
            return ActionResult("exited", f"pid {job.pid} is no longer in agent cgroup {job.cgroup}")
        # Stop first so the tree cannot grow while it is walked; SIGKILL works on stopped tasks.
        try:
            signal.pidfd_send_signal(fd, signal.SIGSTOP)
        except ProcessLookupError:
            return ActionResult("exited", f"pid {job.pid} had already exited")
        victims = self._stop_descendants(job)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            return ActionResult("exited", f"pid {job.pid} had already exited")
        for vfd in victims.values():
            try:
                signal.pidfd_send_signal(vfd, signal.SIGKILL)
            except OSError:
                pass
        ok = _readable(fd, int(self.actions.verify_s * 1000))
        left = [p for p, vfd in victims.items() if not _readable(vfd, 200)]
        for vfd in victims.values():
            os.close(vfd)
        job.descendants = sorted(victims)
        if not ok:
            return ActionResult("reported", f"pid {job.pid} still running {self.actions.verify_s:g}s after SIGKILL")
        extra = f" and {len(victims)} descendant(s) {sorted(victims)[:10]}" if victims else ""
        if left:
            extra += f"; still running: {left[:10]}"
        return ActionResult("killed", f"pid {job.pid}{extra} killed")

    def _kill_left_behind(self, job: ActJob) -> ActionResult:
        """The target is gone, maybe on purpose: exec a miner, fork, exit at once, and the kill
        finds nobody while the fork mines on. What it forked (the kernel's live fork entries
        naming its pid as creator, forked after its image began and before any later holder of
        the pid was) dies with their own descendants, inside the agent's cgroup only. The
        outcome stays `exited`: the target itself was gone; the detail names what was killed."""
        live = self._live_forks(job.submitted) if job.cgroup is not None else []
        roots = self._left_behind(job, live) if live else {}
        if not roots:
            return ActionResult("exited", job.gone)
        victims = self._stop_descendants(job, first=roots, live=live)
        for vfd in victims.values():
            try:
                signal.pidfd_send_signal(vfd, signal.SIGKILL)
            except OSError:
                pass
        left = [p for p, vfd in victims.items() if not _readable(vfd, 200)]
        for vfd in victims.values():
            os.close(vfd)
        job.descendants = sorted(victims)
        if not victims:
            return ActionResult("exited", job.gone)
        extra = f"; still running: {left[:10]}" if left else ""
        return ActionResult("exited", f"{job.gone}; killed {len(victims)} process(es) it left behind "
                                      f"{sorted(victims)[:10]}{extra}")

    def _live_forks(self, since: int) -> list:
        """The kernel's live fork entries, read no earlier than `since` (monotonic ns). A gone
        target's children were forked before its job was submitted, so one read after that
        serves every job queued before it: a flood of kills earned by processes that exit at
        once costs one walk of the map per batch, not one each."""
        if self.kernel_forks is None:
            return []
        scan = self._scan
        if scan is not None and scan[0] >= since:
            return scan[1]
        t = time.monotonic_ns()
        try:
            live = self.kernel_forks()
        except Exception:
            return []
        self._scan = (t, live)
        return live

    def _left_behind(self, job: ActJob, live: list) -> dict:
        """pid -> fork ktime of the live processes the gone target forked (see _kill_left_behind)."""
        began = job.ktime
        rec = getattr(job.alert, "record", None) or {}
        xid = (rec.get("proc") or {}).get("exec_id")
        if isinstance(xid, str):
            try:
                began = min(began, int(xid.rsplit("-", 1)[1]))     # boot id, pid, image start
            except ValueError:
                pass
        until = None
        if self.fork_lookup is not None:
            try:
                ent = self.fork_lookup(job.pid)
            except Exception:
                ent = None
            if ent is not None and not ent[2] & FORKF_EXITED and ent[1] > job.ktime:
                until = ent[1]          # a later holder of the pid: what it forks is its own
        return {pid: kt for pid, creator, kt in live
                if creator == job.pid and kt >= began and (until is None or kt < until)}

    def _stop_descendants(self, job: ActJob, first: Optional[dict] = None, live: Optional[list] = None) -> dict:
        """pid -> pidfd of every live descendant, each stopped. Children come from the kernel's
        /proc/PID/task/*/children (exact: we hold their stopped parent); processes that were
        double-forked away (reparented to init, e.g. `ssh -f`) from the process table's creator
        chain, where an entry counts only if the live process under that pid started when the
        table saw it forked (a recycled pid is someone else) and is in the agent's cgroup."""
        victims: dict[int, int] = {}
        todo = [job.pid]
        seen = {job.pid}
        creator = self._creator_children(live)
        while todo:
            pid = todo.pop()
            if first is not None and pid == job.pid:
                kids = dict(first)      # the target is gone: only what it forked, not the pid's
            else:
                kids = {k: None for k in _proc_children(pid)}
                for k, start_kt in creator.get(pid, ()):
                    kids.setdefault(k, start_kt)
            for k, start_kt in kids.items():
                if k in seen:
                    continue
                seen.add(k)
                # walk through exited intermediates too: a double fork leaves the grandchild
                # linked to us only through its dead parent's entry in the process table
                todo.append(k)
                try:
                    kfd = os.pidfd_open(k)
                except OSError:
                    continue
                if start_kt and not self._began_at(k, start_kt):
                    os.close(kfd)
                    continue
                if job.cgroup is not None and not self.actions._in_cgroup(k, job.cgroup):
                    os.close(kfd)       # outside the agent: not ours to kill
                    continue
                try:
                    signal.pidfd_send_signal(kfd, signal.SIGSTOP)
                except OSError:
                    os.close(kfd)
                    continue
                victims[k] = kfd
        return victims

    def _began_at(self, pid: int, start_kt: int) -> bool:
        """Whether the process on `pid` (pidfd already open) is the one the table or the
        kernel saw begin at `start_kt` (its fork, or an exec whose fork was not seen). A live
        kernel fork entry says it exactly: forked after that, it is a later holder of the pid
        (a child that exited and left its pid to a process forked elsewhere in the agent).
        Else /proc's start time, within its two ticks."""
        look = self.fork_lookup
        if look is not None:
            try:
                ent = look(pid)
            except Exception:
                ent = None
            if ent is not None and not ent[2] & FORKF_EXITED:
                return ent[1] <= start_kt
        st = proc_start_ns(pid)
        return st is not None and abs(st - _boot_minus_mono() - start_kt) <= _START_SLACK_NS

    def _creator_children(self, live: Optional[list] = None) -> dict:
        """creator pid -> [(pid, fork ktime)] from the process table (read, never changed)."""
        out: dict[int, list] = {}
        if self.procs is None:
            return out
        try:
            entries = list(self.procs._t.values())    # one C-level copy: safe against the reader
        except RuntimeError:
            return out
        for p in entries:
            if p.parent:
                out.setdefault(p.parent, []).append((p.pid, p.start_ktime))
        if self.kernel_forks is not None:
            try:
                # the fork time, not the table's exec time, is what /proc's start time shows
                for pid, creator, ktime in (live if live is not None else self.kernel_forks()):
                    if creator:
                        out.setdefault(creator, []).insert(0, (pid, ktime))
            except Exception:
                pass
        return out


def _proc_children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            out.extend(int(x) for x in Path(f"/proc/{pid}/task/{t}/children").read_text().split())
        except (OSError, ValueError):
            pass
    return out
