"""`agenttrace run`: watch cgroups, or start a command in a fresh agent cgroup and trace it."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from agenttrace.enrich.cgroups import TempCgroup, procs as cgroup_procs
from agenttrace.session.isolation import RUN_PIN_ROOT   # run --mode enforce pins here
from agenttrace.session.pipeline import Tracer

RUN_PARENT = "agenttrace"   # fresh agent cgroups live under <cgroup2>/agenttrace/


class StopFlag:
    """SIGINT/SIGTERM → stop; with a child running, the first signal is passed to it."""

    def __init__(self):
        self.stop = False
        self.child: Optional[subprocess.Popen] = None
        self.signals = 0
        self._old = {}

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, _frame):
        if signum == signal.SIGHUP:
            self.reload = True
            return
        self.signals += 1
        if self.child is not None and self.child.poll() is None and self.signals == 1:
            try:
                # the agent leads its own session and group (isolation.agent_preexec): ^C
                # from the caller's terminal reaches it only through us
                os.killpg(self.child.pid, signum)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(self.child.pid, signum)
                except ProcessLookupError:
                    pass
            return
        self.stop = True

    reload = False


def cgroups_pin_dir(paths) -> Path:
    """Where `run --cgroup ... --mode enforce` pins: one folder per set of watched cgroups, so
    the next run on them finds and replaces a killed one's pins."""
    from agenttrace.enrich.cgroups import relpath
    key = "+".join(sorted(relpath(p).strip("/").replace("/", "_") or "root" for p in paths))
    return RUN_PIN_ROOT / f"cgroups-{key}"


def trace_cgroups(tracer: Tracer, flag: StopFlag, on_reload=None, pin_dir: Optional[Path] = None) -> None:
    if pin_dir is not None:
        def pin():
            # our links are attached: a killed predecessor's pins can go without a gap
            tracer.probes.enable_pinning(pin_dir)
            tracer.probes.remove_foreign_pins()
        tracer.before_started.append(pin)
    try:
        tracer.start()      # inside: a start that fails after pinning still removes the folder
        while not flag.stop:
            tracer.poll(100)
            if flag.reload and on_reload is not None:
                flag.reload = False
                on_reload()
    finally:
        tracer.stop()
        if pin_dir is not None:
            _remove_pin_dir(pin_dir)


def _remove_pin_dir(pin_dir: Path) -> None:
    """Remove this run's (emptied) pin folder and, when no other run holds one, the shared
    parent: a run leaves nothing behind. A concurrent run that is creating its own folder
    meanwhile re-creates the parent (mkdir parents=True), so the race costs nothing."""
    for d in (pin_dir, RUN_PIN_ROOT):
        try:
            d.rmdir()
        except OSError:
            pass


def run_command(tracer_factory, cmd: list[str], agent_name: str, flag: StopFlag,
                user=None, pin: bool = False, drop_caps=(), lock=None, netns=None) -> int:
    """Create <cgroup2>/agenttrace/<agent_name>, trace it, run cmd inside, return its code.

    The command runs in its own session (tracer/session/isolation.py), as `user` when given; with
    `pin` (enforce mode) the cgroup programs are pinned before it starts, so killing the
    tracer does not lift its enforcement. `drop_caps` are taken from the command before exec
    (tracer/session/capdrop.py), after it entered `netns` (a namespace file) when given. Processes the command left behind (daemonised
    children) are killed with the cgroup when it exits: the agent's run is over and the
    cgroup must go."""
    from agenttrace.session import isolation as isolation
    from agenttrace.session.agentlock import AgentLock
    # AgentInUse: another run's agent, nothing started (the CLI takes it before its outputs)
    held = lock if lock is not None else AgentLock(agent_name).acquire()
    cg = TempCgroup(f"{RUN_PARENT}/{agent_name}", shared_parents=1)
    try:
        path = cg.create()
    except BaseException:
        held.release()
        raise
    tracer = None
    pin_dir = None
    try:
        tracer = tracer_factory([path])
        tracer.summary_on_stop = "command_exited"
        if pin:
            pin_dir = isolation.run_pin_dir(agent_name)

            def pin_run():
                isolation.sweep_stale_pins(path.parent)
                tracer.probes.enable_pinning(pin_dir)
            tracer.before_started.append(pin_run)
        tracer.start()
        procs_file = str(path / "cgroup.procs")
        try:
            child = subprocess.Popen(cmd, preexec_fn=isolation.agent_preexec(procs_file, user, drop_caps, netns),
                                     env=isolation.user_env(user))
        except FileNotFoundError:
            raise CommandNotFound(cmd[0]) from None
        except PermissionError:
            raise CommandNotFound(cmd[0], "permission denied") from None
        flag.child = child
        while child.poll() is None and not flag.stop:
            tracer.poll(100)
        if child.poll() is None:          # stopped by a second signal
            child.kill()
            child.wait()
        rc = child.returncode
        # the child's own exit record is written by the kernel before wait() returns; drain
        # until the cgroup is empty (leftovers killed) and the ring buffer is read out
        cg.kill_all()
        deadline = time.monotonic() + 5
        while cgroup_procs(path) and time.monotonic() < deadline:
            tracer.poll(20)
        tracer.poll(0)
        return 128 - rc if rc < 0 else rc
    finally:
        if tracer is not None:
            tracer.stop()            # unpins: this run's end is not a tracer death
        if pin_dir is not None:
            _remove_pin_dir(pin_dir)
        try:
            cg.remove()
        finally:
            held.release()


class CommandNotFound(Exception):
    def __init__(self, cmd: str, why: str = "command not found"):
        super().__init__(f"{cmd}: {why}")
