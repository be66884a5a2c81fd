"""The command line: thin. Commands parse and validate input, then hand off to the modules
that do the work. Exit codes live in exitcodes.Exit."""
from __future__ import annotations

import enum
import logging
import os
import sys
from pathlib import Path
from typing import List, Literal, Optional

import typer

from agenttrace import __version__
from agenttrace.cli.exitcodes import Exit

app = typer.Typer(add_completion=True, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="agenttrace: eBPF tracing and policy for AI-agent processes.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"agenttrace {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    """agenttrace: eBPF tracing and policy for AI-agent processes."""
    from agenttrace import native
    try:
        native.check_required()
    except native.NativeError as e:
        raise fail(str(e)) from None


def color_default() -> bool:
    """Colour when writing to a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


from agenttrace.session import InputError as BadInput  # one input-error type for every front end


def fail(msg: str, code: int = Exit.BAD_INPUT) -> "typer.Exit":
    typer.echo(f"agenttrace: {msg}", err=True)
    return typer.Exit(int(code))


def _require_root() -> None:
    if os.geteuid() != 0:
        raise BadInput("must run as root (loading eBPF programs and managing cgroups need it)")


def _resolve_cgroups(paths: List[str]) -> list[Path]:
    from agenttrace.enrich.cgroups import CgroupError, resolve
    out = []
    for p in paths:
        try:
            out.append(resolve(p))
        except CgroupError as e:
            raise BadInput(f"--cgroup: {e}") from None
    return out


def _check_cidrs(cidrs: List[str]) -> list[str]:
    from agenttrace.enrich.scope import parse_cidr
    try:
        return [parse_cidr(c) for c in cidrs]
    except ValueError as e:
        raise BadInput(str(e)) from None


def _sinks(output: Optional[Path], fmt: str, isolated: bool = False):
    from agenttrace.sinks.outputs import StdoutSink, StreamSink
    formatter = None
    if fmt == "ocsf":
        from agenttrace.sinks.ocsf import to_ocsf
        formatter = to_ocsf
    if output is not None and str(output) == "-":
        output = None          # the usual spelling of stdout: never a file named "-"
    if output is not None:
        if not output.parent.is_dir():
            raise BadInput(f"--output: folder {output.parent} does not exist")
        try:
            stream = open(output, "ab", buffering=1 << 16)
        except OSError as e:
            raise BadInput(f"--output: cannot open {output}: {e.strerror}") from None
        from agenttrace.sinks.pipesize import widen_pipe
        widen_pipe(stream)
        return [StreamSink(stream, name="file", formatter=formatter, close_stream=True)]
    if isolated:
        # the agent shares this stdout (often a terminal it can stop): never write it from
        # the reader's thread
        from agenttrace.session.isolation import stdout_sink
        return [stdout_sink(formatter)]
    return [StdoutSink(formatter=formatter)]


def _gpu_config(choice: str):
    if choice not in ("allow", "deny", "off"):
        raise BadInput(f"--gpu: '{choice}' is not one of allow, deny, off")
    if choice == "off":
        return None
    from agenttrace.gpu.service import GpuConfig, GpuGroupPolicy
    return GpuConfig(default=GpuGroupPolicy(allowed=choice == "allow"))


def _labels(specs: List[str]) -> dict:
    from agenttrace.enrich.labels import LabelError, parse_kv
    out = {}
    for spec in specs:
        try:
            k, v = parse_kv(spec)
        except LabelError as e:
            raise BadInput(f"--label: {e}") from None
        out[k] = v
    return out


from agenttrace.session import MODES  # noqa: E402
FORMATS = ("json", "ocsf")
TAIL_ALWAYS = ("started", "reloaded", "reload_failed", "stopped")
FILES_HELP = ("Also trace SSH files (authorized_keys writes, private/host key reads). Off by default: "
              "its syscall tracepoints slow every process's syscalls a little (see README, measured costs).")

PACKET_HELP = ("Also fence packet, netlink, vsock... sockets (the families cgroup/sock_create never sees): "
               "alert in monitor mode, SIGKILL in enforce mode. Off by default: socket() syscall "
               "tracepoints slow every process's syscalls a little (see README, measured costs).")

NOT_HELP = "Leave out the {} probes (on by default)."


def _checked(resolve, value):
    """resolve(value) for an option given, its ValueError as the option's bad input (exit 2)."""
    if value is None:
        return None
    try:
        return resolve(value)
    except ValueError as e:
        raise BadInput(str(e)) from None


def _run_drop_caps(spec: str, mode: str, fence) -> list:
    from agenttrace.session.capdrop import CapError, caps_for_enforce, parse_caps
    if spec == "auto":
        return caps_for_enforce(fence) if mode == "enforce" else []
    try:
        return parse_caps(spec)
    except CapError as e:
        raise BadInput(str(e)) from None


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    cmd: Optional[List[str]] = typer.Argument(None, metavar="[-- CMD ARGS...]",
                                              help="Start CMD in a fresh agent cgroup and trace it until it exits."),
    cgroup: List[str] = typer.Option([], "--cgroup", "-c", help="Watch this cgroup (relative to the cgroup2 mount or absolute); each child is an agent. Repeatable."),
    mode: Literal["monitor", "enforce"] = typer.Option("monitor", "--mode", help="monitor (report only) or enforce (apply rule actions)."),
    fmt: Literal["json", "ocsf"] = typer.Option("json", "--format", help="Record format: the agenttrace JSON lines, or OCSF 1.4.0 events."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write JSON lines here instead of stdout (`-` is stdout)."),
    internal: List[str] = typer.Option([], "--internal", help="CIDR that counts as internal (adds to RFC 1918 & co). Repeatable."),
    agent: Optional[str] = typer.Option(None, "--agent", help="Agent name for -- CMD (default run-<pid>)."),
    rules: List[str] = typer.Option([], "--rules", "-r", help="Rule file or folder (repeatable; default: the built-in pack)."),
    no_rules: bool = typer.Option(False, "--no-rules", help="Trace only: no rules, no alerts."),
    no_net: bool = typer.Option(False, "--no-net", help="Process events only (no connect, flow, DNS or listen hooks)."),
    no_flow: bool = typer.Option(False, "--no-flow", help=NOT_HELP.format("flow (protocol banner)")),
    no_dns: bool = typer.Option(False, "--no-dns", help=NOT_HELP.format("DNS")),
    no_listen: bool = typer.Option(False, "--no-listen", help=NOT_HELP.format("listen/accept")),
    files: bool = typer.Option(False, "--files/--no-files", help=FILES_HELP),
    packet: bool = typer.Option(False, "--packet/--no-packet", help=PACKET_HELP),
    gpu: Literal["allow", "deny", "off"] = typer.Option("allow", "--gpu", help="GPU policy for the traced agents: allow, deny (fenced in enforce mode) or off (no NVML, no fence)."),
    allow_egress: List[str] = typer.Option([], "--allow-egress", metavar="SPEC", help="Let the agents reach this destination: a DNS name (pypi.org), a *. wildcard (*.pythonhosted.org) or a CIDR, optionally :PORT or :LO-HI. Repeatable; @FILE reads one SPEC per line (# comments). Once given, external and metadata destinations not listed are denied (EPERM in enforce mode, reported in monitor mode); names are learned from DNS answers in the kernel, so allow the resolver too."),
    wakeup_ms: float = typer.Option(5.0, "--wakeup-ms", help="Longest a record waits in the kernel ring buffer before it is read; 0 wakes the reader on every record (costs ~20 us of kernel time per event on VMs)."),
    batch_wait_ms: float = typer.Option(50.0, "--batch-wait-ms", help="While records keep coming, how long the reader may let them gather into batches of ~256 (fewer wakeups, less CPU per record); a fast stream is still read every --wakeup-ms, a record after a quiet spell at once, one a rule names (what a userspace kill acts on) within --wakeup-ms, an exec from outside /usr, /bin, /sbin and a connect within 15 ms. Not above --wakeup-ms: never wait longer than it."),
    user: Optional[str] = typer.Option(None, "--user", help="Run CMD as this user (name or uid) instead of root."),
    netns: Optional[str] = typer.Option(None, "--netns", metavar="NAME", help="Run CMD in this network namespace: an `ip netns` name (/run/netns/NAME) or a namespace file (/proc/PID/ns/net). Entered before the capabilities are dropped, so it works in enforce mode, where CMD can no longer enter one itself (CAP_SYS_ADMIN is dropped)."),
    label: List[str] = typer.Option([], "--label", "-l", help="KEY=VALUE on every record's agent object (repeatable); wins over user.agenttrace.KEY xattrs on the cgroup."),
    fork_records: bool = typer.Option(False, "--fork-records/--no-fork-records", help="Send a fork record per new process, as before record schema 1.2 (off: the kernel keeps who forked whom, exec records carry it; on anyway when a rule matches kind fork). See docs/MIGRATION.md."),
    drop_caps: str = typer.Option("auto", "--drop-caps", metavar="CAPS", help="Capabilities -- CMD loses before exec: auto (enforce mode: CAP_NET_RAW, so the kernel refuses packet and raw sockets with EPERM on every path, and what a root agent could turn against the tracer and its fences: CAP_SYS_ADMIN, CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_SYS_RAWIO; monitor mode: none), none, or a list such as net_raw,net_admin (applied in either mode)."),
):
    """Trace watched cgroups, or run CMD in a fresh agent cgroup and trace it."""
    from agenttrace.kernel.loader import ProbeError
    from agenttrace.enrich.cgroups import CgroupError
    import agenttrace.session as S
    try:
        S.check_mode(mode)
        if fmt not in FORMATS:
            raise BadInput(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
        if not 0 <= wakeup_ms <= 1000:
            raise BadInput(f"--wakeup-ms: {wakeup_ms} is not between 0 and 1000")
        if not 0 <= batch_wait_ms <= 1000:
            raise BadInput(f"--batch-wait-ms: {batch_wait_ms} is not between 0 and 1000")
        if not cmd and not cgroup:
            raise BadInput("nothing to trace: give --cgroup PATH or -- CMD ARGS")
        if cmd and cgroup:
            raise BadInput("give either --cgroup or -- CMD, not both")
        if agent is not None and (not agent or "/" in agent or agent in (".", "..")):
            raise BadInput(f"--agent: '{agent}' is not a valid cgroup directory name")
        if user is not None and not cmd:
            raise BadInput("--user applies to -- CMD only")
        if netns is not None and not cmd:
            raise BadInput("--netns applies to -- CMD only")
        labels = _labels(label)
        if drop_caps != "auto" and not cmd:
            raise BadInput("--drop-caps applies to -- CMD only")
        _require_root()
        held = None
        if cmd:
            # before any output file or probe: a name another run holds starts nothing
            import atexit

            from agenttrace.session.agentlock import AgentInUse, AgentLock
            try:
                held = AgentLock(agent or f"run-{os.getpid()}").acquire()
            except AgentInUse as e:
                raise BadInput(str(e)) from None
            atexit.register(held.release)      # the paths that end before run_command does
        from agenttrace.session.isolation import resolve_netns, resolve_user
        run_user = _checked(resolve_user, user)
        netns_path = _checked(resolve_netns, netns)
        egress = None
        if allow_egress:
            from agenttrace.kernel.egress import SpecError, fill_run_policy, run_policy_shell
            if no_net:
                raise BadInput("--allow-egress needs the connect hooks: drop --no-net")
            # its entries are read below, while the kernel verifies the probes
            egress = run_policy_shell(mode)
        opts = S.SessionOptions(
            mode=mode, internal=_check_cidrs(internal), cgroups=_resolve_cgroups(cgroup),
            features=S.features(no_net=no_net, no_flow=no_flow, no_dns=no_dns, no_listen=no_listen, files=files,
                                packet=packet),
            rule_paths=list(rules) or None, use_rules=not no_rules, gpu=_gpu_config(gpu), wakeup_ms=wakeup_ms,
            batch_wait_ms=batch_wait_ms,
            labels=labels, egress=egress, fork_records=fork_records)
        if cmd:
            opts.drop_caps = _run_drop_caps(drop_caps, mode, opts.sock_fence)
        # the kernel verifies the probes while the rules load (docs/STARTUP.md); a rule error
        # closes them unattached
        pre = S.prefetch(opts)
        try:
            if egress:
                try:
                    fill_run_policy(egress, allow_egress)
                except SpecError as e:
                    raise BadInput(str(e)) from None
            ruleset = S.load_ruleset(opts)
            sinks = _sinks(output, fmt, isolated=bool(cmd))
        except BaseException:
            S.discard(pre)
            raise
    except (BadInput, CgroupError) as e:
        raise fail(str(e))
    # the pipeline's modules: imported while the prefetch is in the kernel, not before it
    from agenttrace.session.runner import CommandNotFound, StopFlag, run_command, trace_cgroups

    flag = StopFlag().install()

    def make(paths_):
        opts.cgroups = list(paths_)
        return S.build(opts, sinks, ruleset, prefetch=pre)
    try:
        if cmd:
            rc = run_command(make, cmd, agent or f"run-{os.getpid()}", flag, user=run_user,
                             pin=mode == "enforce", drop_caps=opts.drop_caps, lock=held, netns=netns_path)
            raise typer.Exit(rc)
        tracer = make(opts.cgroups)

        def reload():
            # SIGHUP: re-read the rule files; a rule set that fails keeps the running one
            try:
                new = S.load_ruleset(opts)
                tracer.reload_rules(new)     # writes reload_failed itself when the maps refuse
            except Exception as e:   # bad input, or anything else: the running rules stay
                why = str(e) if isinstance(e, BadInput) else f"{type(e).__name__}: {e}"
                tracer.reload_failed(why)
                typer.echo(f"agenttrace: reload failed, keeping the running rules: {why}", err=True)
        from agenttrace.session.runner import cgroups_pin_dir
        trace_cgroups(tracer, flag, on_reload=None if ruleset is None else reload,
                      pin_dir=cgroups_pin_dir(opts.cgroups) if mode == "enforce" else None)
    except ProbeError as e:
        raise fail(str(e))
    except CommandNotFound as e:
        raise fail(str(e), Exit.CMD_NOT_FOUND)
    finally:
        S.discard(pre)       # not taken: the session ended before its probes loaded
        flag.restore()


# An Enum, not a Literal: typer shows and checks the choices of a repeatable option only so.
RecordKind = enum.Enum("RecordKind", {k: k for k in (
    "exec", "fork", "exit", "connect", "listen", "dns", "flow", "gpu", "device", "file", "alert",
    "lifecycle", "summary")}, type=str)


@app.command()
def tail(
    cmd: Optional[List[str]] = typer.Argument(None, metavar="[-- CMD ARGS...]"),
    cgroup: List[str] = typer.Option([], "--cgroup", "-c", help="Trace these cgroups yourself (when no daemon runs)."),
    socket_path: Path = typer.Option(Path("/run/agenttrace/events.sock"), "--socket", help="The daemon's event socket."),
    agent_f: List[str] = typer.Option([], "--agent", help="Only these agents (repeatable)."),
    kind: List[RecordKind] = typer.Option([], "--kind", help="Only these event kinds (repeatable)."),
    severity: Optional[Literal["info", "low", "medium", "high", "critical"]] = typer.Option(
        None, "--severity", help="Only alerts at or above this severity."),
    alerts: bool = typer.Option(False, "--alerts", help="Only alerts."),
    output_fmt: Optional[Literal["json", "compact", "color"]] = typer.Option(
        None, "--output", "-o", help="json: one JSON record per line (for jq); compact: one plain line per "
        "event; color: the same, coloured. Default: color on a terminal unless NO_COLOR is set, else compact."),
    color: Optional[bool] = typer.Option(None, "--color/--no-color", help="Same as -o color / -o compact."),
    files: bool = typer.Option(False, "--files/--no-files", help=FILES_HELP),
    rules: List[str] = typer.Option([], "--rules", "-r", help="When tracing itself: rule file or folder (repeatable; default: the built-in pack)."),
    no_rules: bool = typer.Option(False, "--no-rules", help="When tracing itself: no rules, no alerts."),
    mode: Literal["monitor", "enforce"] = typer.Option("monitor", "--mode", help="When tracing itself: monitor or enforce."),
    internal: List[str] = typer.Option([], "--internal", help="When tracing itself: CIDR that counts as internal. Repeatable."),
    no_net: bool = typer.Option(False, "--no-net", help="When tracing itself: process events only (no connect, flow, DNS or listen hooks)."),
    label: List[str] = typer.Option([], "--label", "-l", help="Only records whose agent has KEY=VALUE (repeatable; e.g. episode=ep-7). Filtered by the daemon when attached to it."),
    netns: Optional[str] = typer.Option(None, "--netns", metavar="NAME", help="As `run --netns`: run CMD in this network namespace (an `ip netns` name or a namespace file), entered before the capabilities are dropped."),
):
    """The human view: one coloured line per event. Attaches to the daemon when it runs."""
    from agenttrace.sinks.tailview import Filter, render
    from agenttrace.session.runner import StopFlag, run_command, trace_cgroups
    from agenttrace.kernel.loader import ProbeError
    from agenttrace.enrich.cgroups import CgroupError
    from agenttrace.sinks.outputs import dumps_line
    import agenttrace.session as S
    if output_fmt is None:
        output_fmt = ("color" if color else "compact") if color is not None else \
            ("color" if color_default() else "compact")
    use_color = output_fmt == "color"
    try:
        want = _labels(label)
        # one matcher (sinkfilter.RecordFilter) for every tail filter, labels included
        filt = Filter(agents=agent_f or None, kinds=[k.value for k in kind] or None, min_severity=severity,
                      alerts_only=alerts, labels=want)
    except BadInput as e:
        raise fail(str(e))
    except ValueError as e:
        raise fail(str(e))

    def line(r: dict) -> str:
        if output_fmt == "json":
            return dumps_line(r)[:-1].decode()
        return render(r, color=use_color)

    class _TermSink:
        name = "terminal"
        dropped = 0
        fd = None       # tail -- CMD: a private descriptor, written off the reader's thread

        def emit_batch(self, records):
            out = []
            for r in records:
                # the tracer's own state (attached, reloaded, stopped) shows whatever the filter,
                # to a person; `-o json` feeds programs, which get exactly what they filtered
                if filt.accepts(r) or (output_fmt != "json" and r.get("kind") == "lifecycle"
                                       and r.get("phase") in TAIL_ALWAYS):
                    out.append(line(r))
            if not out:
                return
            text = "\n".join(out) + "\n"
            if self.fd is None:
                sys.stdout.write(text)
                sys.stdout.flush()
                return
            data = memoryview(text.encode("utf-8", "backslashreplace"))
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:
                self.dropped += len(out)

        def emit(self, record):
            self.emit_batch([record])

        def close(self):
            pass

    if not cmd and not cgroup:
        from agenttrace.sinks.outputs import read_socket_records
        if not socket_path.exists():
            raise fail(f"no daemon socket at {socket_path}: start `agenttrace daemon`, or give --cgroup PATH / -- CMD to trace directly")
        sink = _TermSink()
        try:
            if want:
                from agenttrace.client import Client
                stream = Client(str(socket_path), labels=want, reconnect=False)
            else:
                stream = read_socket_records(str(socket_path))
            for rec in stream:
                sink.emit(rec)
        except PermissionError:
            raise fail(f"{socket_path}: permission denied (the event socket is root-only)")
        except (ConnectionRefusedError, FileNotFoundError):
            raise fail(f"{socket_path}: no daemon is listening")
        except ConnectionError:
            return      # the daemon closed the stream
        except RuntimeError as e:     # client.ClientError: refused subscription / root-only
            raise fail(str(e))
        except KeyboardInterrupt:
            pass
        return
    try:
        if netns is not None and not cmd:
            raise BadInput("--netns applies to -- CMD only")
        S.check_mode(mode)
        _require_root()
        from agenttrace.session.isolation import resolve_netns
        netns_path = _checked(resolve_netns, netns)
        # the same session `run` builds (probes, rules, enforcement): only the sink differs
        opts = S.SessionOptions(mode=mode, cgroups=_resolve_cgroups(cgroup), internal=_check_cidrs(internal),
                                features=S.features(no_net=no_net, files=files), rule_paths=list(rules) or None,
                                use_rules=not no_rules, gpu=_gpu_config("allow"))
        if cmd:
            # the same capability drop as `run -- CMD` (tracer/session/capdrop.py)
            opts.drop_caps = _run_drop_caps("auto", mode, opts.sock_fence)
        pre = S.prefetch(opts)       # as in `run`: verified while the rules load
        try:
            ruleset = S.load_ruleset(opts)
        except BaseException:
            S.discard(pre)
            raise
    except (BadInput, CgroupError) as e:
        raise fail(str(e))
    flag = StopFlag().install()
    paths = opts.cgroups

    def make(paths_):
        opts.cgroups = list(paths_)
        sink = _TermSink()
        if cmd:
            # the agent shares this terminal and may stop it (tcflow): see tracer/session/isolation.py
            from agenttrace.sinks.outputs import QueuedSink
            sink.fd = os.dup(1)
            sink = QueuedSink(sink)
            sink.close_timeout = 2.0
        return S.build(opts, [sink], ruleset, prefetch=pre)
    try:
        if cmd:
            # pinned in enforce mode as under `run`: killing this tail does not lift the fences
            raise typer.Exit(run_command(make, cmd, f"tail-{os.getpid()}", flag, pin=mode == "enforce",
                                         drop_caps=opts.drop_caps, netns=netns_path))
        trace_cgroups(make(paths), flag)
    except ProbeError as e:
        raise fail(str(e))
    finally:
        S.discard(pre)
        flag.restore()


rules_app = typer.Typer(no_args_is_help=True, help="Check and replay rule files.")
app.add_typer(rules_app, name="rules")


@rules_app.command("lint")
def rules_lint(paths: List[Path] = typer.Argument(..., help="Rule files or folders.")):
    """Validate rule files; exit 2 listing every error as file:line:col."""
    from agenttrace.kernel.capability import lint
    from agenttrace.match.rules import expand_paths
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
    from agenttrace.match.engine import replay
    from agenttrace.match.rules import RulesError, expand_paths
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
        from agenttrace.sinks.tailview import render
        for a in alerts:
            typer.echo(render(a, color=color))
        typer.echo(f"{len(alerts)} alert(s)")


policy_app = typer.Typer(no_args_is_help=True, help="Egress policies from what workloads really do.")
app.add_typer(policy_app, name="policy")


@policy_app.command("learn")
def policy_learn(
    events: Path = typer.Option(..., "--events", help="Recorded JSON lines of a benign run."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the YAML here instead of stdout."),
    as_flags: bool = typer.Option(False, "--flags", help="Print `--allow-egress SPEC` arguments for `run` instead of YAML."),
):
    """Write the egress allow-list that would have permitted a recorded run (no root needed)."""
    from agenttrace.match.policylearn import LearnError, learn, render
    try:
        text = render(learn(str(events)), str(events), as_flags)
    except LearnError as e:
        raise fail(str(e))
    if output is not None:
        try:
            output.write_text(text)
        except OSError as e:
            raise fail(f"--output: cannot write {output}: {e.strerror}")
    else:
        sys.stdout.write(text)


@app.command()
def daemon(config: Path = typer.Option(Path("/etc/agenttrace/agenttrace.yaml"), "--config", help="The daemon's YAML config."),
           status_file: Path = typer.Option(Path("/run/agenttrace/status.json"), "--status-file", hidden=True)):
    """The systemd service: watch agent cgroups per the config, write to its sinks."""
    from agenttrace.ops.daemon import DaemonInputError, run_daemon
    from agenttrace.ops.journal import setup_daemon_logging
    from agenttrace.kernel.loader import ProbeError
    setup_daemon_logging()
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
def demo(color: Optional[bool] = typer.Option(None, "--color/--no-color"),
         events: Optional[Path] = typer.Option(None, "--events", help="Also write every record to this JSON lines file (for `agenttrace report`).")):
    """A misbehaving agent in a throwaway sandbox, traced in monitor then enforce mode."""
    from agenttrace.lab.demo import run_demo
    try:
        _require_root()
    except BadInput as e:
        raise fail(str(e))
    use_color = color_default() if color is None else color
    if events is not None and not events.parent.is_dir():
        raise fail(f"--events: folder {events.parent} does not exist")
    raise typer.Exit(run_demo(typer.echo, color=use_color, events_path=str(events) if events else None))


@app.command()
def report(events: Path = typer.Argument(..., help="Recorded JSON lines (agenttrace run -o / the daemon's file sink)."),
           html_out: Optional[Path] = typer.Option(None, "--html", help="Write one self-contained HTML page here instead."),
           agent_f: List[str] = typer.Option([], "--agent", help="Only these agents or episodes (repeatable)."),
           limit: int = typer.Option(200, "--limit", help="Timeline lines per agent in the terminal."),
           color: Optional[bool] = typer.Option(None, "--color/--no-color")):
    """What each agent (episode) did: a timeline per agent, in the terminal or as HTML."""
    from agenttrace.ops.report import ReportInputError, run_report
    if not events.is_file():
        raise fail(f"{events}: no such file")
    if html_out is not None and not html_out.parent.is_dir():
        raise fail(f"--html: folder {html_out.parent} does not exist")
    use_color = color_default() if color is None else color
    try:
        rc = run_report(str(events), str(html_out) if html_out else None, typer.echo, color=use_color,
                        limit=limit, agents=agent_f or None)
    except ReportInputError as e:
        raise fail(str(e))
    raise typer.Exit(rc)


@app.command()
def prepare(command: Optional[List[str]] = typer.Argument(None, metavar="[-- run OPTIONS...]", help="Also compile what this `agenttrace run` command line loads (its --files, --no-*, --rules, --gpu, --allow-egress)."),
            config: List[Path] = typer.Option([], "--config", help="Also compile what `agenttrace daemon --config FILE` loads (repeatable; default: /etc/agenttrace/agenttrace.yaml where it exists)."),
            with_run: bool = typer.Option(True, "--run/--no-run", help="Compile what `agenttrace run` loads by default, with and without --allow-egress.")):
    """Compile the probes a start will load into the probe cache, so the first start is as fast as the next."""
    from agenttrace.kernel.loader import ProbeError
    from agenttrace.kernel.probecache import CompileError
    from agenttrace.ops.prepare import DEFAULT_CONFIG, PrepareInputError, prepare as run_prepare
    try:
        _require_root()
        configs = list(config) or ([DEFAULT_CONFIG] if DEFAULT_CONFIG.exists() else [])
        if command and command[0] != "run":
            raise BadInput(f"after --: an `agenttrace run` command line (`-- run OPTIONS`), not `{command[0]}`")
        run_prepare(configs, with_run, typer.echo, command=command[1:] if command else None)
    except (BadInput, PrepareInputError, ProbeError) as e:
        raise fail(str(e))
    except CompileError as e:
        raise fail(f"compiling the probes failed: {e}", Exit.FAILURE)


@app.command()
def doctor():
    """What this machine supports, and what to do about what it lacks."""
    from agenttrace.ops.doctor import run_checks
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
