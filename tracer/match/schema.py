"""The rule-file schema: constants and the pydantic models of a rule file (data only).

Split from the loader (match/rules.py) so that what builds rules — the loader, and the egress
policy of the daemon config (match/egress_policy.py), which becomes rules too — depends on the
schema, not on each other.
"""
from __future__ import annotations

import fnmatch  # noqa: F401  (validators below)
import ipaddress  # noqa: F401
import re  # noqa: F401
from dataclasses import dataclass, field  # noqa: F401
from typing import Any, Dict, List, Literal, Optional, Tuple, Union  # noqa: F401

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator  # noqa: F401

from agenttrace.match.linregex import LinearRegexError, compile_linear  # noqa: F401

CATEGORIES = ("tunnel", "mining", "scan", "gpu", "egress", "exec", "escape", "download-exec")
SEVERITIES = ("info", "low", "medium", "high", "critical")
ACTIONS = ("report", "block", "kill", "kill-agent", "freeze-agent")
EVENT_KINDS = ("exec", "fork", "exit", "connect", "listen", "dns", "flow", "gpu", "device", "file",
               "socket", "escape")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}

# Which top-level sections a record of each kind carries (the record contract (tracer/schema/event.schema.json)). Used to reject a CEL
# condition or a match group that can never see its data for one of the rule's kinds.
COMMON_VARS = ("ts", "kind", "node", "agent")
KIND_SECTIONS: Dict[str, Tuple[str, ...]] = {
    "exec": ("proc",),
    "fork": ("proc",),
    "exit": ("proc", "exit_code", "duration_ms"),
    "connect": ("proc", "net"),
    "listen": ("proc", "net"),
    "dns": ("proc", "dns"),
    "flow": ("proc", "net", "flow"),
    "gpu": ("proc", "gpu"),
    "device": ("proc", "device"),
    "file": ("proc", "file"),
    "socket": ("proc", "socket"),
    "escape": ("proc", "escape"),
}
CEL_VARS = COMMON_VARS + ("proc", "exit_code", "duration_ms", "net", "dns", "flow", "gpu",
                          "device", "file", "lists")
FILE_CLASSES = ("authorized_keys", "private_key", "host_key", "ssh_other", "unknown")
FILE_OPS = ("read", "write")

# Protocols the kernel can tell from a flow's first payload bytes (cgroup_skb egress).
KERNEL_PROTOCOLS = ("ssh", "stratum")
FLOW_PROTOCOLS = ("ssh", "stratum", "tls", "http", "unknown")
SCOPES = ("loopback", "internal", "metadata", "external")


# --------------------------------------------------------------------------- errors

@dataclass
class RuleError:
    file: str
    line: int           # 1-based; 0 when unknown
    column: int         # 1-based; 0 when unknown
    field: str          # dotted path inside the file, e.g. rules[3].match.dst.ports[2]
    message: str
    rule_id: Optional[str] = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        rid = f" rule '{self.rule_id}'" if self.rule_id else ""
        fld = f" {self.field}:" if self.field else ""
        return f"{where}:{rid}{fld} {self.message}"


class RulesError(Exception):
    """Every problem found while loading a rule set (never just the first)."""

    def __init__(self, errors: List[RuleError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


# --------------------------------------------------------------------------- schema

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PortSpec = Union[int, str]          # 22, "8000-8100", "$miner_ports"


class DstMatch(_Strict):
    cidrs: List[str] = Field(default_factory=list)
    ports: List[PortSpec] = Field(default_factory=list)
    scopes: List[str] = Field(default_factory=list)
    names: List[str] = Field(default_factory=list)     # wildcards, case-insensitive


class ExeMatch(_Strict):
    paths: List[str] = Field(default_factory=list)          # wildcards on proc.exe
    basenames: List[str] = Field(default_factory=list)      # wildcards on basename(exe), comm or proc.identity.names
    identities: List[str] = Field(default_factory=list)     # wildcards on proc.identity.name (content identity)
    args_contain: List[str] = Field(default_factory=list)   # substring of the joined command line
    args_regex: List[str] = Field(default_factory=list)     # regex searched in each argument
    cmdline_regex: List[str] = Field(default_factory=list)  # regex searched in the joined command line


class DeviceMatch(_Strict):
    majors: List[int] = Field(default_factory=list)


class FileMatch(_Strict):
    classes: List[str] = Field(default_factory=list)   # authorized_keys|private_key|host_key|ssh_other|unknown
    ops: List[str] = Field(default_factory=list)       # read|write
    paths: List[str] = Field(default_factory=list)     # wildcards on file.path (absolute when resolved)


class MatchBase(_Strict):
    groups: List[str] = Field(default_factory=list)   # agent groups (agent.group, "default" when unset)
    dst: Optional[DstMatch] = None
    proto: List[Literal["tcp", "udp"]] = Field(default_factory=list)
    protocols: List[str] = Field(default_factory=list)
    exe: Optional[ExeMatch] = None
    device: Optional[DeviceMatch] = None
    file: Optional[FileMatch] = None


class Match(MatchBase):
    # exceptions: an event matching any of them does not fire
    unless: Optional[Union[MatchBase, List[MatchBase]]] = None


class Window(_Strict):
    count: int = Field(ge=1)
    seconds: float = Field(gt=0)
    distinct: Optional[Union[str, List[str]]] = None

    def distinct_fields(self) -> Tuple[str, ...]:
        if self.distinct is None:
            return ()
        return (self.distinct,) if isinstance(self.distinct, str) else tuple(self.distinct)


class Dedup(_Strict):
    fields: Optional[List[str]] = None
    seconds: float = Field(default=60.0, gt=0)


class RuleModel(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=80)
    description: str = Field(min_length=20)
    category: Literal[CATEGORIES]  # type: ignore[valid-type]
    severity: Literal[SEVERITIES]  # type: ignore[valid-type]
    on: List[Literal[EVENT_KINDS]] = Field(min_length=1)  # type: ignore[valid-type]
    match: Optional[Match] = None
    condition: Optional[str] = None
    window: Optional[Window] = None
    dedup: Optional[Dedup] = None
    action: Literal[ACTIONS] = "report"  # type: ignore[valid-type]
    tags: List[str] = Field(default_factory=list)
    message: Optional[str] = None          # template, {proc.exe}-style fields
    enabled: bool = True

    @field_validator("tags")
    @classmethod
    def _attack_ids(cls, v: List[str]) -> List[str]:
        for t in v:
            if not re.fullmatch(r"T\d{4}(\.\d{3})?|TA\d{4}", t):
                raise ValueError(f"tag {t!r} is not a MITRE ATT&CK id (T1234, T1234.001, TA0011)")
        return v

    @model_validator(mode="after")
    def _something_to_match(self) -> "RuleModel":
        if self.match is None and self.condition is None and self.window is None:
            raise ValueError("a rule needs at least one of match, condition, window")
        return self


ListItem = Union[int, str]


class ListDef(_Strict):
    items: List[ListItem]
    description: Optional[str] = None
    source: Optional[str] = None


class RuleFile(_Strict):
    lists: Dict[str, Union[ListDef, List[ListItem]]] = Field(default_factory=dict)
    rules: List[RuleModel] = Field(default_factory=list)

    @field_validator("lists")
    @classmethod
    def _list_names(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        for k in v:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", k):
                raise ValueError(f"list name {k!r} must be lower_snake_case (it is a CEL field name)")
        return v


# --------------------------------------------------------------------------- YAML positions

