"""The command line: thin. Commands parse and validate input, then hand off to the modules
that do the work. Exit codes live in exitcodes.Exit."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .exitcodes import Exit

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="agenttrace: eBPF tracing and policy for AI-agent processes.")


class BadInput(Exception):
    """Bad CLI/config/rules input or an environment that cannot run: exit 2, nothing started."""


def fail(msg: str, code: int = Exit.BAD_INPUT) -> "typer.Exit":
    typer.echo(f"agenttrace: {msg}", err=True)
    return typer.Exit(int(code))


def _require_root() -> None:
    if os.geteuid() != 0:
        raise BadInput("must run as root (loading eBPF programs and managing cgroups need it)")


def _resolve_cgroups(paths: List[str]) -> list[Path]:
    from .cgroups import CgroupError, resolve
    out = []
    for p in paths:
        try:
            out.append(resolve(p))
        except CgroupError as e:
            raise BadInput(f"--cgroup: {e}") from None
    return out


def _check_cidrs(cidrs: List[str]) -> list[str]:
    from .netscope import parse_cidr
    try:
        return [parse_cidr(c) for c in cidrs]
    except ValueError as e:
        raise BadInput(str(e)) from None


def _sinks(output: Optional[Path], fmt: str):
    from .sinks import StdoutSink, StreamSink
    formatter = None
    if fmt == "ocsf":
        from .ocsf import to_ocsf
        formatter = to_ocsf
    if output is not None:
        if not output.parent.is_dir():
            raise BadInput(f"--output: folder {output.parent} does not exist")
        try:
            stream = open(output, "ab", buffering=1 << 16)
        except OSError as e:
            raise BadInput(f"--output: cannot open {output}: {e.strerror}") from None
        return [StreamSink(stream, name="file", formatter=formatter, close_stream=True)]
    return [StdoutSink(formatter=formatter)]


def _load_engine(rule_paths: List[str], mode: str, egress=None):
    """Rules are checked before anything is attached; every error is listed."""
    from .engine import Engine
    from .policy import PolicyError, compile_policy
    from .rules import RulesError, default_rule_paths, expand_paths, load_rules
    for p in rule_paths:
        if not Path(p).exists():
            raise BadInput(f"--rules: {p} does not exist")
    paths = expand_paths(rule_paths) if rule_paths else default_rule_paths()
    try:
        rs = load_rules(paths, egress=egress)
        compile_policy(rs)
    except RulesError as e:
        raise BadInput("invalid rules:\n" + "\n".join(f"  {x}" for x in e.errors)) from None
    except PolicyError as e:
        raise BadInput(f"rules cannot be enforced: {e}") from None
    return Engine(rs, mode=mode)


def _gpu_config(choice: str):
    if choice not in ("allow", "deny", "off"):
        raise BadInput(f"--gpu: '{choice}' is not one of allow, deny, off")
    if choice == "off":
        return None
    from .gpu import GpuConfig, GpuGroupPolicy
    return GpuConfig(default=GpuGroupPolicy(allowed=choice == "allow"))


MODES = ("monitor", "enforce")
FORMATS = ("json", "ocsf")
FILES_HELP = ("Also trace SSH files (authorized_keys writes, private/host key reads). Off by default: "
              "its syscall tracepoints slow every process's syscalls a little (see README, measured costs).")


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    cmd: Optional[List[str]] = typer.Argument(None, metavar="[-- CMD ARGS...]",
                                              help="Start CMD in a fresh agent cgroup and trace it until it exits."),
    cgroup: List[str] = typer.Option([], "--cgroup", "-c", help="Watch this cgroup (relative to the cgroup2 mount or absolute); each child is an agent. Repeatable."),
    mode: str = typer.Option("monitor", "--mode", help="monitor (report only) or enforce (apply rule actions)."),
    fmt: str = typer.Option("json", "--format", help="json or ocsf"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write JSON lines here instead of stdout."),
    internal: List[str] = typer.Option([], "--internal", help="CIDR that counts as internal (adds to RFC 1918 & co). Repeatable."),
    agent: Optional[str] = typer.Option(None, "--agent", help="Agent name for -- CMD (default run-<pid>)."),
    rules: List[str] = typer.Option([], "--rules", "-r", help="Rule file or folder (repeatable; default: the built-in pack)."),
    no_rules: bool = typer.Option(False, "--no-rules", help="Trace only: no rules, no alerts."),
    no_net: bool = typer.Option(False, "--no-net", help="Process events only (no connect hooks)."),
    files: bool = typer.Option(False, "--files/--no-files", help=FILES_HELP),
    gpu: str = typer.Option("allow", "--gpu", help="GPU policy for the traced agents: allow, deny (fenced in enforce mode) or off (no NVML, no fence)."),
    wakeup_ms: float = typer.Option(5.0, "--wakeup-ms", help="Longest a record waits in the kernel ring buffer before it is read; 0 wakes the reader on every record (costs ~20 us of kernel time per event on VMs)."),
):
    """Trace watched cgroups, or run CMD in a fresh agent cgroup and trace it."""
    from .runtime import Options, Tracer
    from .runner import CommandNotFound, StopFlag, run_command, trace_cgroups
    from .probes import ProbeError
    from .cgroups import CgroupError
    try:
        if mode not in MODES:
            raise BadInput(f"--mode: '{mode}' is not one of {', '.join(MODES)}")
        if fmt not in FORMATS:
            raise BadInput(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
        if not 0 <= wakeup_ms <= 1000:
            raise BadInput(f"--wakeup-ms: {wakeup_ms} is not between 0 and 1000")
        if not cmd and not cgroup:
            raise BadInput("nothing to trace: give --cgroup PATH or -- CMD ARGS")
        if cmd and cgroup:
            raise BadInput("give either --cgroup or -- CMD, not both")
        if agent is not None and (not agent or "/" in agent or agent in (".", "..")):
            raise BadInput(f"--agent: '{agent}' is not a valid cgroup directory name")
        _require_root()
        cidrs = _check_cidrs(internal)
        paths = _resolve_cgroups(cgroup)
        from .probes import DEFAULT_FEATURES
        # the whole default set: flows and DNS are where disguised tunnels and miners show
        features = (("proc",) if no_net else DEFAULT_FEATURES) + (("files",) if files else ())
        engine = None if no_rules else _load_engine(rules, mode)
        gpu_cfg = _gpu_config(gpu)
        sinks = _sinks(output, fmt)
    except BadInput as e:
        raise fail(str(e))
    except CgroupError as e:
        raise fail(str(e))

    flag = StopFlag().install()

    def make(paths_):
        return Tracer(Options(cgroups=list(paths_), mode=mode, features=features, internal=cidrs,
                              gpu=gpu_cfg, wakeup_ms=wakeup_ms), sinks, engine=engine)
    try:
        if cmd:
            rc = run_command(make, cmd, agent or f"run-{os.getpid()}", flag)
            raise typer.Exit(rc)
        tracer = make(paths)

        def reload():
            # SIGHUP: re-read the rule files; a rule set that fails keeps the running one
            try:
                new = _load_engine(rules, mode)
            except BadInput as e:
                tracer._lifecycle("reload_failed", error=str(e))
                typer.echo(f"agenttrace: reload failed, keeping the running rules: {e}", err=True)
                return
            tracer.reload_rules(new.ruleset)
        trace_cgroups(tracer, flag, on_reload=None if engine is None else reload)
    except ProbeError as e:
        raise fail(str(e))
    except CommandNotFound as e:
        raise fail(str(e), Exit.CMD_NOT_FOUND)
    finally:
        flag.restore()


@app.command()
def tail(
    cmd: Optional[List[str]] = typer.Argument(None, metavar="[-- CMD ARGS...]"),
    cgroup: List[str] = typer.Option([], "--cgroup", "-c", help="Trace these cgroups yourself (when no daemon runs)."),
    socket_path: Path = typer.Option(Path("/run/agenttrace/events.sock"), "--socket", help="The daemon's event socket."),
    agent_f: List[str] = typer.Option([], "--agent", help="Only these agents (repeatable)."),
    kind: List[str] = typer.Option([], "--kind", help="Only these event kinds (repeatable)."),
    severity: Optional[str] = typer.Option(None, "--severity", help="Only alerts at or above this severity."),
    alerts: bool = typer.Option(False, "--alerts", help="Only alerts."),
    color: Optional[bool] = typer.Option(None, "--color/--no-color", help="Colour (default: when a terminal)."),
    files: bool = typer.Option(False, "--files/--no-files", help=FILES_HELP),
):
    """The human view: one coloured line per event. Attaches to the daemon when it runs."""
    from .tailview import Filter, render
    from .runtime import Options, Tracer
    from .runner import StopFlag, run_command, trace_cgroups
    from .probes import ProbeError
    from .cgroups import CgroupError
    use_color = sys.stdout.isatty() if color is None else color
    try:
        filt = Filter(agents=agent_f or None, kinds=kind or None, min_severity=severity, alerts_only=alerts)
    except ValueError as e:
        raise fail(str(e))

    class _TermSink:
        name = "terminal"
        dropped = 0

        def emit_batch(self, records):
            out = []
            for r in records:
                if filt.accepts(r):
                    out.append(render(r, color=use_color))
            if out:
                sys.stdout.write("\n".join(out) + "\n")
                sys.stdout.flush()

        def emit(self, record):
            self.emit_batch([record])

        def close(self):
            pass

    if not cmd and not cgroup:
        from .sinks import read_socket_records
        if not socket_path.exists():
            raise fail(f"no daemon socket at {socket_path}: start `agenttrace daemon`, or give --cgroup PATH / -- CMD to trace directly")
        sink = _TermSink()
        try:
            for rec in read_socket_records(str(socket_path)):
                sink.emit(rec)
        except PermissionError:
            raise fail(f"{socket_path}: permission denied (the event socket is root-only)")
        except (ConnectionRefusedError, FileNotFoundError):
            raise fail(f"{socket_path}: no daemon is listening")
        except KeyboardInterrupt:
            pass
        return
    try:
        _require_root()
        paths = _resolve_cgroups(cgroup)
    except (BadInput, CgroupError) as e:
        raise fail(str(e))
    flag = StopFlag().install()

    from .probes import DEFAULT_FEATURES
    features = DEFAULT_FEATURES + (("files",) if files else ())

    def make(paths_):
        return Tracer(Options(cgroups=list(paths_), features=features), [_TermSink()])
    try:
        if cmd:
            raise typer.Exit(run_command(make, cmd, f"tail-{os.getpid()}", flag))
        trace_cgroups(make(paths), flag)
    except ProbeError as e:
        raise fail(str(e))
    finally:
        flag.restore()


rules_app = typer.Typer(no_args_is_help=True, help="Check and replay rule files.")
app.add_typer(rules_app, name="rules")


@rules_app.command("lint")
def rules_lint(paths: List[Path] = typer.Argument(..., help="Rule files or folders.")):
    """Validate rule files; exit 2 listing every error as file:line:col."""
    from .rules import expand_paths, lint
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise fail(f"no such file or folder: {', '.join(missing)}")
    files = expand_paths(paths)
    errors = lint(files)
    for e in errors:
        typer.echo(str(e), err=True)
    if errors:
        typer.echo(f"{len(errors)} error(s) in {len(files)} file(s)", err=True)
        raise typer.Exit(Exit.BAD_INPUT)
    typer.echo(f"ok: {len(files)} file(s)")


@rules_app.command("test")
def rules_test(
    paths: List[Path] = typer.Argument(..., help="Rule files or folders."),
    events: Path = typer.Option(..., "--events", help="Recorded JSON lines to replay."),
    color: bool = typer.Option(False, "--color/--no-color"),
    as_json: bool = typer.Option(False, "--json", help="Print alert records as JSON lines."),
):
    """Replay recorded events through the rules offline (no root) and print the alerts."""
    from .engine import replay
    from .rules import RulesError, expand_paths
    import orjson
    missing = [str(p) for p in list(paths) + [events] if not p.exists()]
    if missing:
        raise fail(f"no such file or folder: {', '.join(missing)}")
    try:
        alerts = replay(expand_paths(paths), str(events))
    except RulesError as e:
        for x in e.errors:
            typer.echo(str(x), err=True)
        raise typer.Exit(Exit.BAD_INPUT)
    except ValueError as e:
        raise fail(str(e))
    if as_json:
        for a in alerts:
            sys.stdout.buffer.write(orjson.dumps(a) + b"\n")
    else:
        from .tailview import render
        for a in alerts:
            typer.echo(render(a, color=color))
        typer.echo(f"{len(alerts)} alert(s)")


@app.command()
def daemon(config: Path = typer.Option(Path("/etc/agenttrace/agenttrace.yaml"), "--config", help="The daemon's YAML config."),
           status_file: Path = typer.Option(Path("/run/agenttrace/status.json"), "--status-file", hidden=True)):
    """The systemd service: watch agent cgroups per the config, write to its sinks."""
    from .daemon import DaemonInputError, run_daemon
    from .probes import ProbeError
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _require_root()
        rc = run_daemon(str(config), status_file)
    except (BadInput, DaemonInputError) as e:
        raise fail(str(e))
    except ProbeError as e:
        raise fail(str(e))
    raise typer.Exit(rc)


@app.command()
def status(status_file: Path = typer.Option(Path("/run/agenttrace/status.json"), "--status-file"),
           as_json: bool = typer.Option(False, "--json")):
    """The running daemon's probes, watched agents, counters and mode."""
    import json
    try:
        st = json.loads(status_file.read_text())
    except FileNotFoundError:
        raise fail(f"no daemon status at {status_file}: is `agenttrace daemon` running?", Exit.FAILURE)
    except PermissionError:
        raise fail(f"{status_file}: permission denied (root only)")
    alive = True
    try:
        os.kill(int(st["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError):
        alive = False
    st["running"] = alive
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    c = st.get("counters", {})
    d = c.get("drops", {})
    typer.echo(f"daemon pid {st.get('pid')} ({'running' if alive else 'NOT running: stale status'}), mode {st.get('mode')}")
    typer.echo(f"config   {st.get('config')}")
    typer.echo(f"probes   {', '.join(st.get('probes', []))}")
    typer.echo(f"watching {', '.join(st.get('watched', [])) or '-'}")
    typer.echo(f"agents   {', '.join(st.get('agents', [])) or '-'}")
    typer.echo(f"pinning  {st.get('pinning')}")
    typer.echo(f"events {c.get('events', 0)}  alerts {c.get('alerts', 0)}  kernel drops {d.get('kernel', 0)}  "
               f"sink drops {sum((d.get('sinks') or {}).values())}")
    if not alive:
        raise typer.Exit(Exit.FAILURE)


@app.command()
def demo(color: Optional[bool] = typer.Option(None, "--color/--no-color")):
    """A misbehaving agent in a throwaway sandbox, traced in monitor then enforce mode."""
    from .demo import run_demo
    try:
        _require_root()
    except BadInput as e:
        raise fail(str(e))
    use_color = sys.stdout.isatty() if color is None else color
    raise typer.Exit(run_demo(typer.echo, color=use_color))


@app.command()
def doctor():
    """What this machine supports, and what to do about what it lacks."""
    from .doctor import run_checks
    ok = run_checks(typer.echo)
    raise typer.Exit(Exit.OK if ok else Exit.FAILURE)


@app.command()
def version():
    """Print the version."""
    typer.echo(f"agenttrace {__version__}")


def main() -> None:
    app(prog_name="agenttrace")


if __name__ == "__main__":
    main()
