"""The daemon's one YAML config file: pydantic models and a loader whose errors name file,
line and field.

Unknown keys are errors (a typo must not silently fall back to a default on a security
tool). `packaging/agenttrace.example.yaml` documents every key and is loaded by a test.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import os
import string
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ByteSize, ConfigDict, Field, ValidationError, PrivateAttr, field_validator)

from agenttrace.gpu.service import GpuConfig
from agenttrace.match.egress_policy import EgressPolicy

DEFAULT_PATH = "/etc/agenttrace/agenttrace.yaml"
DEFAULT_SOCKET = "/run/agenttrace/events.sock"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


_NAME_FIELDS = {"name", "parent", "path", "cgroup_id"}
_RESERVED_LABELS = {"id", "cgroup", "cgroup_id"}


class AgentWatch(_Model):
    """One watched cgroup pattern and how its agents are named and labelled."""

    cgroup: str
    """Path relative to the cgroup2 mount, e.g. `/agents`; glob characters (`*`, `?`, `[...]`)
    match existing and future cgroups, e.g. `/kubepods.slice/*/agent-*`."""
    agent: Literal["child", "self"] = "child"
    """`child`: each direct child cgroup is one agent; `self`: the matched cgroup is one agent."""
    name: str = "{name}"
    """Agent id template: {name} directory name, {parent} its parent's name, {path} the
    cgroup path relative to the mount, {cgroup_id}."""
    labels: Dict[str, str] = Field(default_factory=dict)

    @field_validator("cgroup")
    @classmethod
    def _cgroup(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/' (a path relative to the cgroup2 mount, e.g. /agents)")
        if any(part == ".." for part in v.split("/")):
            raise ValueError("must not contain '..'")
        if v.startswith("/sys/fs/cgroup"):
            raise ValueError("give the path relative to the cgroup2 mount (e.g. /agents), not the cgroupfs path")
        return v.rstrip("/") or "/"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"bad template: {e}") from None
        bad = fields - _NAME_FIELDS
        if bad:
            raise ValueError(f"unknown placeholder(s) {', '.join('{%s}' % b for b in sorted(bad))}; "
                             f"allowed: {', '.join('{%s}' % f for f in sorted(_NAME_FIELDS))}")
        if not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: Dict[str, str]) -> Dict[str, str]:
        for k in v:
            if k in _RESERVED_LABELS:
                raise ValueError(f"label {k!r} would overwrite the agent's own field")
            if not k.isidentifier():
                raise ValueError(f"label name {k!r} must be an identifier (letters, digits, _)")
        return v


    def _parts(self) -> List[str]:
        return [p for p in self.cgroup.split("/") if p]

    def agent_cgroup(self, path: str) -> Optional[str]:
        """The agent cgroup (relative to the mount) that a process in cgroup `path` belongs to
        under this watch, or None when `path` is outside it. Glob characters match within one
        path component. With agent=child, a process directly in the watched cgroup is an agent
        of its own, named after the watched cgroup (README, Using it)."""
        pat = self._parts()
        parts = [p for p in path.split("/") if p]
        if len(parts) < len(pat):
            return None
        if not all(fnmatch.fnmatchcase(c, p) for c, p in zip(parts, pat)):
            return None
        depth = len(pat) + (1 if self.agent == "child" and len(parts) > len(pat) else 0)
        return "/" + "/".join(parts[:depth])

    def agent_id(self, agent_cgroup: str, cgroup_id: int = 0) -> str:
        """The agent id for an agent cgroup, from the `name` template."""
        parts = [p for p in agent_cgroup.split("/") if p]
        return self.name.format(name=parts[-1] if parts else "/", parent=parts[-2] if len(parts) > 1 else "",
                                path="/" + "/".join(parts), cgroup_id=cgroup_id)


RECORD_KINDS = ("exec", "fork", "exit", "connect", "listen", "dns", "flow", "gpu", "device", "file",
                "alert", "lifecycle", "summary")


class SinkFilterConfig(_Model):
    """Which records one sink takes (tracer/sinks/filter.py); every key optional, ANDed."""
    kinds: Optional[List[Literal[RECORD_KINDS]]] = None  # type: ignore[valid-type]
    min_severity: Optional[Literal["info", "low", "medium", "high", "critical"]] = None
    agents: Optional[List[str]] = None
    labels: Dict[str, str] = Field(default_factory=dict)

    @field_validator("kinds", "agents")
    @classmethod
    def _nonempty(cls, v):
        if v is not None and not v:
            raise ValueError("an empty list would match nothing; leave the key out to match all")
        return v


class StdoutSinkConfig(_Model):
    filter: Optional[SinkFilterConfig] = None


class FileSinkConfig(_Model):
    path: str
    filter: Optional[SinkFilterConfig] = None
    max_bytes: ByteSize = ByteSize(100 * 1024 * 1024)
    keep: int = Field(5, ge=1, le=1000)

    @field_validator("max_bytes")
    @classmethod
    def _positive(cls, v: ByteSize) -> ByteSize:
        if v < 4096:
            raise ValueError("must be at least 4KiB")
        return v


class SocketSinkConfig(_Model):
    path: str = DEFAULT_SOCKET

    @field_validator("path")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute path")
        if len(v.encode()) > 107:
            raise ValueError("longer than a Unix socket path may be (107 bytes)")
        return v


class SyslogSinkConfig(_Model):
    address: str = "/dev/log"
    facility: str = "daemon"
    filter: Optional[SinkFilterConfig] = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        from agenttrace.sinks.outputs import parse_syslog_address
        parse_syslog_address(v)
        return v

    @field_validator("facility")
    @classmethod
    def _facility(cls, v: str) -> str:
        from agenttrace.sinks.outputs import _FACILITIES
        if v not in _FACILITIES:
            raise ValueError(f"unknown facility; one of {', '.join(_FACILITIES)}")
        return v


class SinksConfig(_Model):
    format: Literal["json", "ocsf"] = "json"
    # true/false, or {filter: {...}} for stdout with a filter
    stdout: Union[bool, StdoutSinkConfig] = True
    file: Optional[FileSinkConfig] = None
    socket: Optional[SocketSinkConfig] = Field(default_factory=SocketSinkConfig)
    syslog: Optional[SyslogSinkConfig] = None


class LimitsConfig(_Model):
    ring_buffer_pages: int = Field(1024, ge=1)
    agent_events_per_sec: int = Field(20000, ge=0)
    agent_burst: Optional[int] = Field(None, ge=1)
    # auto: freeze-agent in enforce mode, report in monitor mode
    flood_action: Literal["auto", "report", "freeze-agent"] = "auto"
    sink_queue: int = Field(10000, ge=1)
    proc_table_size: int = Field(65536, ge=64)
    # the longest a record waits in the ring buffer (0 = wake the reader on every record)
    wakeup_ms: float = Field(5.0, ge=0, le=1000)
    # while records keep coming, how long the reader may let them gather into one batch
    batch_wait_ms: float = Field(50.0, ge=0, le=1000)
    # seconds between lifecycle/stats records (counters, drops by agent and cause)
    stats_interval: float = Field(60.0, gt=0, le=86400)

    @field_validator("ring_buffer_pages")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("must be a power of two (the kernel's ring buffer requires it)")
        return v


def _parse_listen(v: str) -> tuple:
    if v.startswith("["):
        host, sep, port = v[1:].partition("]:")
    else:
        host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError("expected IP:PORT, e.g. 127.0.0.1:9464")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return host, int(port)


class MetricsConfig(_Model):
    enabled: bool = False
    listen: str = "127.0.0.1:9464"
    # per-agent series kept (agents with the most drops); the rest are summed as `_other`
    max_agents: int = Field(50, ge=1, le=10000)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _parse_listen(v)
        return v

    @property
    def address(self) -> tuple:
        return _parse_listen(self.listen)


class PinningConfig(_Model):
    enabled: bool = False
    fail_mode: Literal["closed", "open"] = "closed"
    path: str = "/sys/fs/bpf/agenttrace"
    # fail_mode closed: seconds the pinned connect hooks wait for the daemon's heartbeat
    # before they deny agents every non-loopback destination (enforce mode)
    grace_s: float = Field(5.0, gt=0, le=300)

    @field_validator("path")
    @classmethod
    def _bpffs(cls, v: str) -> str:
        if not v.startswith("/sys/fs/bpf/"):
            raise ValueError("must be a directory under the bpffs mount /sys/fs/bpf/")
        return v


def _default_fence():
    from agenttrace.kernel.sockfence import DEFAULT_FENCE
    return DEFAULT_FENCE


class ProbesConfig(_Model):
    files: bool = False
    """SSH-file probes (syscall tracepoints on open/openat/openat2/creat/rename/link): writes
    to authorized_keys, reads of private and host keys. Off by default because every
    syscall tracepoint moves every task on the node to the slow syscall path; the cost
    measured here is in the README. Changing it takes a restart (probes stay attached
    across reloads)."""
    packet: bool = False
    """The socket fence for families cgroup/sock_create never sees (packet, netlink, vsock...):
    socket() syscall tracepoints (probes/packet.c), so off by default for the same reason as
    `files` (it costs nothing more when `files` is on). Without it, `socket_fence` entries of
    those families are listed as unseen in lifecycle/started. Changing it takes a restart."""
    fork_records: bool = False
    """One `fork` record per new process, as before schema 1.2 (docs/MIGRATION.md). Off, the
    kernel keeps who forked whom, exec records carry the creator, and exits of processes no
    record named stay in the kernel (counted in summaries). On anyway when a rule matches kind
    `fork`. A runtime switch: a reload applies it."""
    packet_scan_s: float = Field(2.0, ge=0, le=3600)
    """While `packet` is off: seconds between scans of the packet sockets agents hold
    (/proc/<pid>/net/packet, then their fd tables), each reported once, after the fact. No
    syscall cost; misses sockets that live shorter than the interval. 0 turns it off."""


class Config(_Model):
    node: Optional[str] = None
    mode: Literal["monitor", "enforce"] = "monitor"
    agents: List[AgentWatch] = Field(default_factory=list)
    rules: List[str] = Field(default_factory=list)
    internal_cidrs: List[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]] = Field(default_factory=list)
    # the subnets of the node's own interfaces (netlink) count as internal too
    node_subnets_internal: bool = True
    # Validated by the models that use them, so an error names file, line and field.
    egress: Optional[Dict[str, EgressPolicy]] = None
    gpu: Optional[GpuConfig] = None
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    pinning: PinningConfig = Field(default_factory=PinningConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    # sockets agents may not create (EPERM in enforce mode, reported in monitor mode):
    # FAMILY[:TYPE[:PROTO]] (tracer/kernel/sockfence.py); inet/inet6 entries are held by
    # cgroup/sock_create, other families only with `probes.packet`
    socket_fence: List[str] = Field(default_factory=lambda: list(_default_fence()))

    _source: Optional[str] = PrivateAttr(None)
    # line of each `egress.<group>` in the file: errors about a group's policy point at it
    _egress_lines: Dict[str, int] = PrivateAttr(default_factory=dict)
    # line of each `rules` entry: a refused rule path points at it
    _rules_lines: List[int] = PrivateAttr(default_factory=list)

    @property
    def source(self) -> Optional[str]:
        """The file this was loaded from (set by load_config)."""
        return self._source

    @field_validator("socket_fence")
    @classmethod
    def _fence(cls, v: List[str]) -> List[str]:
        from agenttrace.kernel.sockfence import parse_fence
        for i, spec in enumerate(v):
            try:
                parse_fence(spec)
            except ValueError as e:
                raise ValueError(f"entry {i}: {e}") from None
        return v

    @field_validator("internal_cidrs", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> Any:
        # ip_network(strict) refuses host bits set; say which entry is wrong, not a union dump.
        if isinstance(v, list):
            out = []
            for i, item in enumerate(v):
                try:
                    out.append(ipaddress.ip_network(str(item), strict=True))
                except ValueError as e:
                    raise ValueError(f"entry {i} ({item!r}): {e}") from None
            return out
        return v


class ConfigIssue:
    __slots__ = ("file", "line", "column", "field", "message")

    def __init__(self, file: str, line: Optional[int], column: Optional[int], field: str, message: str):
        self.file, self.line, self.column, self.field, self.message = file, line, column, field, message

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"

    def __repr__(self) -> str:
        return f"ConfigIssue({str(self)!r})"


class ConfigError(Exception):
    """Every problem found in a config file; `str()` lists them one per line."""

    def __init__(self, issues: List[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _mark(node: yaml.Node) -> tuple:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _locate(root: Optional[yaml.Node], loc: tuple) -> tuple:
    """Line/column of the YAML node a pydantic error location points at (the deepest that
    exists: a missing field points at its parent mapping)."""
    if root is None:
        return None, None
    node, mark = root, _mark(root)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    # Point at the value for bad values, which is what an editor wants; the key
                    # line and the value line differ only for block collections.
                    node, mark = v, _mark(k if not isinstance(v, yaml.ScalarNode) else v)
                    break
            else:
                return mark
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            mark = _mark(node)
        else:
            return mark
    return mark


def _duplicates(node: Optional[yaml.Node], path: tuple, out: List[tuple]) -> None:
    # PyYAML keeps the last of two equal keys without a word; on a policy file that hides edits.
    if isinstance(node, yaml.MappingNode):
        seen: Dict[str, yaml.Node] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                if k.value in seen:
                    out.append((path + (k.value,), k, seen[k.value]))
                seen[k.value] = k
                _duplicates(v, path + (k.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _duplicates(v, path + (i,), out)


def _field_name(loc: tuple) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _compose_and_construct(text: str):
    """The node tree (for error positions) and the data, from one parse. libyaml's parser when
    PyYAML has it: a config with a 100,000-name allow-list took 45 s in the Python parser (and
    was parsed twice). A document libyaml refuses is parsed again by the Python parser, so
    syntax errors read exactly as they always did. Both use SafeLoader's resolvers."""
    loaders = [yaml.SafeLoader]
    if getattr(yaml, "__with_libyaml__", False):
        loaders.insert(0, yaml.CSafeLoader)
    for i, cls in enumerate(loaders):
        loader = cls(text)
        try:
            root = loader.get_single_node()
            return root, (loader.construct_document(root) if root is not None else None)
        except yaml.YAMLError:
            if i == len(loaders) - 1:
                raise
        finally:
            loader.dispose()
    raise AssertionError("unreachable")


def _untrusted(path: str) -> Optional[str]:
    from agenttrace.ops.filetrust import untrusted_reason
    why = untrusted_reason(path)
    return None if why is None else (f"refusing {path}: {why}; a user who can change it could rewrite "
                                     "the policy (chown root, chmod go-w)")


def _read_allow_files(cfg: Config, root: Optional[yaml.Node], filename: str, base: Path,
                      trust: bool = False) -> List[ConfigIssue]:
    """Each egress group's `allow_file` read into its `allow` (after the inline entries), as
    one compact AllowList: no model per entry. The path is made absolute (against `base`, the
    config file's folder) so a reload reads the same file. Problems are issues naming the
    allow file's own line, or the config line of the key when the file cannot be read."""
    from agenttrace.kernel.egress import read_allow_file
    from agenttrace.match.egress_policy import AllowList
    issues: List[ConfigIssue] = []
    for group, pol in (cfg.egress or {}).items():
        if pol.allow_file is None:
            continue
        field = f"egress.{group}.allow_file"
        path = pol.allow_file if os.path.isabs(pol.allow_file) else str(base / pol.allow_file)
        why = _untrusted(path) if trust else None
        if why:
            line, col = _locate(root, ("egress", group, "allow_file"))
            issues.append(ConfigIssue(filename, line, col, field, why))
            continue
        allow = AllowList()
        for d in pol.allow:
            allow.add(d.spec(), d.cidr is not None, tuple(d.ports), d.proto)
        try:
            bad = read_allow_file(path, allow)
        except (OSError, UnicodeDecodeError) as e:
            line, col = _locate(root, ("egress", group, "allow_file"))
            issues.append(ConfigIssue(filename, line, col, field,
                                      f"cannot read {path}: {getattr(e, 'strerror', None) or e}"))
            continue
        issues.extend(ConfigIssue(path, n, None, field, msg) for n, msg in bad)
        cfg.egress[group] = pol.model_copy(update={"allow": allow, "allow_file": path})
    return issues


def parse_config(text: str, filename: str = "<config>", base: Optional[Union[str, os.PathLike]] = None,
                 trust: bool = False) -> Config:
    """Validate YAML text. Raises ConfigError listing every problem. `base`: the folder that
    relative `allow_file` paths are read from (the config file's; default the current one).
    `trust`: refuse allow files and rule paths a user other than root could change (the
    daemon's inputs, tracer/ops/filetrust.py)."""
    try:
        root, data = _compose_and_construct(text)
    except yaml.YAMLError as e:
        m = getattr(e, "problem_mark", None)
        msg = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError([ConfigIssue(filename, m.line + 1 if m else None, m.column + 1 if m else None,
                                       "", f"YAML syntax: {msg}")]) from None
    issues: List[ConfigIssue] = []
    dups: List[tuple] = []
    _duplicates(root, (), dups)
    for path, k, first in dups:
        issues.append(ConfigIssue(filename, k.start_mark.line + 1, k.start_mark.column + 1, _field_name(path),
                                  f"duplicate key (first at line {first.start_mark.line + 1})"))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        line, col = _locate(root, ())
        issues.append(ConfigIssue(filename, line, col, "", "the config must be a mapping of keys to values"))
        raise ConfigError(issues)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            loc = tuple(err["loc"])
            line, col = _locate(root, loc)
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            issues.append(ConfigIssue(filename, line, col, _field_name(loc), msg))
        cfg = None
    if issues:
        issues.sort(key=lambda i: (i.line or 0, i.column or 0))
        raise ConfigError(issues)
    assert cfg is not None
    cfg._egress_lines = {g: _locate(root, ("egress", g))[0] or 0 for g in (cfg.egress or {})}
    cfg._rules_lines = [_locate(root, ("rules", i))[0] or 0 for i in range(len(cfg.rules))]
    issues = _read_allow_files(cfg, root, filename, Path(base) if base is not None else Path.cwd(), trust)
    if issues:
        raise ConfigError(issues)
    return cfg


def load_config(path: Union[str, os.PathLike], trust: bool = False) -> Config:
    """Load and validate a config file. Relative `rules` and file-sink paths are resolved
    against the config file's folder. Raises ConfigError (with file, line, field).
    `trust`: the daemon's check that nobody but root could have changed the file, its rule
    files or its allow files (tracer/ops/filetrust.py)."""
    p = Path(path)
    why = _untrusted(str(p)) if trust else None
    if why:
        raise ConfigError([ConfigIssue(str(p), None, None, "", why)])
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigIssue(str(p), None, None, "", f"cannot read: {e.strerror or e}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([ConfigIssue(str(p), None, None, "", f"not UTF-8: {e}")]) from None
    base = p.resolve().parent
    cfg = parse_config(text, str(p), base, trust)
    cfg.rules = [str(base / r) if not os.path.isabs(r) else r for r in cfg.rules]
    if trust:
        _check_rule_paths(cfg, str(p))
    if cfg.sinks.file is not None and not os.path.isabs(cfg.sinks.file.path):
        cfg.sinks.file.path = str(base / cfg.sinks.file.path)
    cfg._source = str(p)
    return cfg


def _check_rule_paths(cfg: Config, filename: str) -> None:
    """Each `rules` entry, and for a folder every rule file in it, changeable by root alone."""
    from agenttrace.match.rulefiles import expand_paths
    issues: List[ConfigIssue] = []
    for i, r in enumerate(cfg.rules):
        line = cfg._rules_lines[i] if i < len(cfg._rules_lines) else None
        for f in dict.fromkeys([r] + (expand_paths([r]) if os.path.isdir(r) else [])):
            why = _untrusted(f)
            if why:
                issues.append(ConfigIssue(filename, line or None, None, f"rules[{i}]", why))
                break
    if issues:
        raise ConfigError(issues)
