"""Rule files: loading, typed validation, CEL compilation and lint.

A rule file is YAML, data only::

    lists:
      miner_ports:
        source: "where the list came from"
        items: [3333, 4444]
      tunnel_tools: [chisel, ngrok]          # a plain list is fine too
    rules:
      - id: mining-pool-port
        description: why the rule exists and how to tune it
        category: mining                     # tunnel|mining|scan|gpu|egress|exec
        severity: high                       # info|low|medium|high|critical
        on: [connect]
        match:                               # declarative, fields a kernel map can hold
          dst: {scopes: [external], ports: ["$miner_ports"]}
        condition: 'proc.comm != "sshd"'     # optional CEL over the event record
        window: {count: 30, distinct: [net.dst.addr, net.dst.port], seconds: 10}
        action: block                        # report|block|kill|kill-agent|freeze-agent
        tags: [T1496]

`"$name"` inside a match list splices in the shared list `name`; CEL sees the lists as
`lists.name`. Lists are shared between all files loaded together. Every problem is reported
with file, line, column and field; `load_rules` raises `RulesError` carrying all of them, so
a reload either yields a whole new `RuleSet` or nothing.
"""
from __future__ import annotations

import fnmatch
import gc
import ipaddress
import os
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agenttrace.match.linregex import LinearRegexError, compile_linear, Searcher
from agenttrace.match.rulefiles import default_rule_paths, expand_paths  # noqa: F401  (re-exported)

from agenttrace.match.egress_policy import _safe_id as _safe_group_id, egress_rule_models
from agenttrace.match.schema import (  # noqa: F401  (the schema, re-exported for the loader's users)
    ACTIONS,
    CATEGORIES,
    CEL_VARS,
    COMMON_VARS,
    Dedup,
    DeviceMatch,
    DstMatch,
    EVENT_KINDS,
    ExeMatch,
    FILE_CLASSES,
    FILE_OPS,
    FLOW_PROTOCOLS,
    FileMatch,
    KERNEL_PROTOCOLS,
    KIND_SECTIONS,
    ListDef,
    ListItem,
    Match,
    MatchBase,
    PortSpec,
    RuleError,
    RuleFile,
    RuleModel,
    RulesError,
    SCOPES,
    SEVERITIES,
    SEVERITY_RANK,
    Window,
    _Strict)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: `on:` is a rule field, not `True` (YAML 1.1 reads on/off/yes/no as bools)."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))

# libyaml's parser under the same resolvers: the pure-Python one was ~0.13 s of every start
# with the default pack (docs/STARTUP.md). Its marks carry line and column but not the text.
_FastLoader = None
if getattr(yaml, "__with_libyaml__", False):
    class _FastLoader(yaml.CSafeLoader):    # type: ignore[no-redef]
        pass
    _FastLoader.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


def _compose_and_load(text: str) -> Tuple[Optional[yaml.Node], Any]:
    """The node tree (for error positions) and the data of one YAML document. A file libyaml
    refuses is parsed again by the Python parser, so errors read exactly as they always did."""
    if _FastLoader is not None:
        try:
            return _compose_then_build(text)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=_Loader), yaml.load(text, Loader=_Loader)


class _NotPlain(Exception):
    """A document `_build` leaves to PyYAML's constructor."""


_STR, _SEQ, _MAP = "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"


def _compose_then_build(text: str) -> Tuple[Optional[yaml.Node], Any]:
    """libyaml composes the tree once, and the data is built from that tree: composing twice
    (once for the tree, once inside `yaml.load`) and PyYAML's per-node constructor calls were
    most of what 500 rules added to a start. A document with merge keys, non-string keys or
    alias cycles takes PyYAML's own `load` (its constructor rewrites merged mappings in the
    tree, which the error positions read)."""
    loader = _FastLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        try:
            return node, _build(node, loader, set())
        except (_NotPlain, RecursionError):
            pass
    finally:
        loader.dispose()
    return node, yaml.load(text, Loader=_FastLoader)


def _build(node: yaml.Node, loader, active: set) -> Any:
    """What SafeConstructor makes of `node` (tests/test_rules_yaml_parsers.py): strings,
    lists and dicts here, other scalars (int, float, bool, null) by its own methods."""
    tag = node.tag
    if isinstance(node, yaml.ScalarNode):
        return node.value if tag == _STR else loader.construct_object(node, deep=True)
    if id(node) in active:
        raise _NotPlain()
    active.add(id(node))
    if isinstance(node, yaml.SequenceNode) and tag == _SEQ:
        out: Any = [_build(n, loader, active) for n in node.value]
    elif isinstance(node, yaml.MappingNode) and tag == _MAP:
        out = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag != _STR:
                raise _NotPlain()
            out[k.value] = _build(v, loader, active)
    else:
        raise _NotPlain()
    active.discard(id(node))
    return out


def _node_at(root: Optional[yaml.Node], loc: Sequence[Any], key: bool = True) -> Tuple[Optional[yaml.Node], bool]:
    """Walk a composed YAML tree along a pydantic error location.

    Returns the deepest node reached and whether the whole path was found. For a mapping
    the last step lands on the key node (an unknown field points at its name)."""
    node = root
    loc = [p for p in loc if not _is_union_tag(p)]
    for i, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    nxt = k if (key and i == len(loc) - 1) else v
                    break
            if nxt is None:
                return node, False
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node, False
            node = node.value[part]
        else:
            # pydantic adds union-branch names ("list[...]", "ListDef") into loc; skip them
            continue
    return node, True


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union branch it tried into the location: "list[...]", "MatchBase", "int"
    return isinstance(part, str) and ("[" in part or part[:1].isupper() or part in ("int", "str"))


def _mark(node: Optional[yaml.Node]) -> Tuple[int, int]:
    if node is None:
        return 0, 0
    return node.start_mark.line + 1, node.start_mark.column + 1


def _field_path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_union_tag(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


# --------------------------------------------------------------------------- CEL

_cel_envs: Dict[str, Any] = {}


def _typed_pool():
    """A protobuf descriptor pool describing the event records (the record contract (tracer/schema/event.schema.json)) so that CEL type
    checking catches misspelt fields (`proc.arg`) and type mistakes (`net.dst.port == "22"`)
    at load time. Evaluation uses plain maps; this pool is only for checking."""
    from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="agenttrace_event.proto", package="agenttrace",
                                             syntax="proto3", dependency=["google/protobuf/struct.proto"])
    T = {"s": F.TYPE_STRING, "i": F.TYPE_INT64, "b": F.TYPE_BOOL, "d": F.TYPE_DOUBLE}

    def msg(name: str, fields: Dict[str, str]) -> None:
        m = fdp.message_type.add(name=name)
        for n, (fname, t) in enumerate(fields.items(), 1):
            rep = t.startswith("*")
            t = t.lstrip("*")
            f = m.field.add(name=fname, number=n,
                            label=F.LABEL_REPEATED if rep else F.LABEL_OPTIONAL)
            if t in T:
                f.type = T[t]
            else:
                f.type = F.TYPE_MESSAGE
                f.type_name = t if t.startswith(".google") else f".agenttrace.{t}"

    msg("Ancestor", {"pid": "i", "comm": "s", "exe": "s"})
    msg("Proc", {"pid": "i", "ppid": "i", "uid": "i", "comm": "s", "exe": "s", "args": "*s",
                 "ancestry": "*Ancestor", "filename": "s", "killed_in_kernel": "b",
                 "args_truncated": "b", "args_read_failed": "b", "identity": ".google.protobuf.Struct",
                 "ssh": ".google.protobuf.Struct", "relay_of": ".google.protobuf.Struct",
                 "fresh_exe": ".google.protobuf.Struct", "egress": ".google.protobuf.Struct",
                 "gpu": ".google.protobuf.Struct"})
    msg("Endpoint", {"addr": "s", "port": "i", "scope": "s", "name": "s"})
    msg("Net", {"proto": "s", "family": "s", "op": "s", "what": "s", "src": "Endpoint", "dst": "Endpoint",
                "local": "Endpoint", "verdict": "s", "result": "s", "error": "i"})
    msg("Dns", {"query": "s", "qtype": "s", "server": "Endpoint",
                "answers": ".google.protobuf.ListValue"})
    # detail's keys depend on the protocol (banner, method, sni, host, ...): a map
    msg("Flow", {"protocol": "s", "detail": ".google.protobuf.Struct"})
    # numbers that may be int or float in records: dyn, so `>= 50` and `>= 50.5` both check
    msg("Gpu", {"index": "i", "uuid": "s", "name": "s", "used_memory_mib": ".google.protobuf.Value",
                "sm_util_pct": ".google.protobuf.Value"})
    # access is a string or a list of strings (mknod/read/write)
    msg("Device", {"major": "i", "minor": "i", "access": ".google.protobuf.Value", "verdict": "s"})
    msg("File", {"path": "s", "raw_path": "s", "op": "s", "syscall": "s", "flags": "*s", "class": "s",
                 "verdict": "s", "kill_effect": "s", "policy_id": "i", "path_unresolved": "b",
                 "path_read_failed": "b", "path_truncated": "b", "path_read_late": "b"})
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return pool


def cel_envs():
    """(check_env, eval_env), built once per process."""
    if not _cel_envs:
        from cel_expr_python import cel as C

        dyn_map = C.Type.Map(C.Type.STRING, C.Type.DYN)
        lists_t = C.Type.Map(C.Type.STRING, C.Type.List(C.Type.DYN))
        common = {"ts": C.Type.STRING, "kind": C.Type.STRING, "node": C.Type.STRING,
                  "agent": dyn_map, "exit_code": C.Type.INT, "duration_ms": C.Type.DYN,
                  "lists": lists_t}
        typed = dict(common)
        for name, msg in (("proc", "Proc"), ("net", "Net"), ("dns", "Dns"), ("flow", "Flow"),
                          ("gpu", "Gpu"), ("device", "Device"), ("file", "File")):
            typed[name] = C.Type(f"agenttrace.{msg}")
        untyped = dict(common)
        for name in ("proc", "net", "dns", "flow", "gpu", "device", "file"):
            untyped[name] = dyn_map
        try:
            from cel_expr_python.ext import ext_strings
            exts = [ext_strings.ExtStrings()]
        except Exception:  # the strings extension is a convenience, not a requirement
            exts = []
        _cel_envs["check"] = C.NewEnv(_typed_pool(), variables=typed, extensions=exts)
        _cel_envs["eval"] = C.NewEnv(variables=untyped, extensions=exts)
        _cel_envs["C"] = C
    return _cel_envs["check"], _cel_envs["eval"]


_CEL_POS = re.compile(r"<input>:(\d+):(\d+):\s*(.*)")
_IDENT = re.compile(r"(?<![.\w])([A-Za-z_]\w*)")
_STRLIT = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"")


def referenced_vars(expr: str) -> Tuple[str, ...]:
    """Top-level CEL variables an expression uses; only those are converted per event."""
    bare = _STRLIT.sub("''", expr)
    return tuple(v for v in CEL_VARS if v in set(_IDENT.findall(bare)))


@dataclass
class CompiledCondition:
    source: str
    program: Any
    variables: Tuple[str, ...]
    # only the shared lists the expression names: converting every list for every
    # evaluation cost ~60 µs per event with the default pack
    lists: Dict[str, List[Any]] = field(default_factory=dict)


# compiled CEL conditions by their text, for this process's two environments (cel_envs):
# rules that share a condition share its program (an evaluation keeps no state in it), and a
# reload compiles only the conditions it has not seen; a changed text is a new key
_CEL_CACHE: "OrderedDict[str, Tuple[str, Any, Any, Any]]" = OrderedDict()
_CEL_CACHE_MAX = 4096


def _cel_compiled(source: str, check_env, eval_env) -> Tuple[str, Any]:
    """(the type-checked return type's name, the program) of a condition; a compile error
    raises, every time (errors are not kept)."""
    hit = _CEL_CACHE.get(source)
    if hit is not None and hit[2] is check_env and hit[3] is eval_env:
        _CEL_CACHE.move_to_end(source)
        return hit[0], hit[1]
    rt_name = check_env.compile(source).return_type().name()
    prog = eval_env.compile(source)
    _CEL_CACHE[source] = (rt_name, prog, check_env, eval_env)
    if len(_CEL_CACHE) > _CEL_CACHE_MAX:
        _CEL_CACHE.popitem(last=False)
    return rt_name, prog


def _cel_errors(node: Optional[yaml.Node], msg: str, source: Optional[str] = None) -> List[Tuple[int, int, str]]:
    """Every error in a CEL compiler message, each placed in the YAML file."""
    parts = [p for p in re.split(r"(?=ERROR: <input>:)", msg) if "<input>:" in p]
    if not parts or not isinstance(node, yaml.ScalarNode):
        line, col = _mark(node)
        first = msg.strip().splitlines()[0] if msg.strip() else msg
        return [(line, col, first)]
    return [_cel_error_position(node, p.split("\n")[0], source) for p in parts]


def _cel_error_position(node: yaml.ScalarNode, msg: str, source: Optional[str] = None) -> Tuple[int, int, str]:
    """Map `<input>:L:C` in a CEL error to a line and column in the YAML file (`source`: the
    file's, for marks that do not carry it: libyaml's)."""
    m = _CEL_POS.search(msg)
    line, col = _mark(node)
    first = msg.strip().splitlines()[0] if msg.strip() else msg
    if not m:
        return line, col, first
    el, ec, text = int(m.group(1)), int(m.group(2)), m.group(3)
    text = re.sub(r"^ERROR:\s*", "", text)
    if node.style in ("|", ">"):
        # block scalar: content starts on the next line at the block's indentation
        buf = node.start_mark.buffer or source
        raw_lines = buf.splitlines() if buf else []
        fl = node.start_mark.line + el      # 0-based file line of expression line el
        indent = 0
        first_content = node.start_mark.line + 1
        if 0 <= first_content < len(raw_lines):
            indent = len(raw_lines[first_content]) - len(raw_lines[first_content].lstrip(" "))
        return fl + 1, indent + ec, text
    if el == 1:
        return line, col + ec - 1 + (1 if node.style in ("'", '"') else 0), text
    return line + el - 1, ec, text


# --------------------------------------------------------------------------- compiled rules

class _Wild:
    """fnmatch patterns, matched whole: the literal ones in a set, the rest in one regex.
    An allow-list of 10,000 names compiled as regexes took 2.7 s to start and ~5 KB of memory a
    name, and matching was a regex walk over every name; a set lookup is neither."""
    __slots__ = ("exact", "_rx", "_wild", "icase")

    def __init__(self, pats: List[str], icase: bool):
        self.icase = icase
        joined = _all_text(pats)
        if joined is not None and not _is_wild(joined):
            wild = []       # a long literal list (allowed names): no check per pattern
            lower = not icase or joined.lower() == joined
            self.exact = frozenset(pats if lower else map(_lower, pats))
        else:
            wild = [p for p in pats if _is_wild(p)]
            exact = (p for p in pats if not _is_wild(p)) if wild else pats
            self.exact = frozenset(map(_lower, exact) if icase else exact)
        # compiled when first needed: most rules' wildcards never meet a record that gets
        # past their gates, and a compile each was most of what 500 rules added to a start
        # (fnmatch's translation always compiles, so no load error is deferred)
        self._wild = tuple(wild)
        self._rx = None

    @property
    def rx(self) -> Optional[re.Pattern]:
        if self._rx is None and self._wild:
            self._rx = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self._wild),
                                  re.IGNORECASE if self.icase else 0)
        return self._rx

    def match(self, s: str) -> bool:
        if self.icase:
            s = s.lower()
        if s in self.exact:
            return True
        if not self._wild:
            return False
        rx = self._rx or self.rx
        return rx.match(s) is not None


def _wild(patterns: Iterable[str], icase: bool = False) -> Optional[_Wild]:
    pats = list(patterns)
    if not pats:
        return None
    return _Wild(pats, icase)


def _combined(pats: list):
    """One RE2 pattern that matches where any of `pats` (compiled RE2 patterns) does."""
    import re2
    return re2.compile("|".join(f"(?:{p.pattern})" for p in pats))


def _is_wild(s: str) -> bool:
    return "*" in s or "?" in s or "[" in s


def _lower(s: str) -> str:
    """`s.lower()`, but `s` itself where it is lowercase already: a 100,000-name allow-list
    then shares one string per name between the policy, the rule and its set."""
    low = s.lower()
    return s if low == s else low


def _literal_prefix(pattern: str) -> str:
    """What every string an fnmatch pattern matches starts with: its text before the first
    wildcard character."""
    for i, c in enumerate(pattern):
        if c in "*?[":
            return pattern[:i]
    return pattern


@dataclass
class CompiledMatch:
    """A `match` block ready for the hot path. Every group given must hold (AND); inside a
    group any listed value may match (OR)."""
    nets: List[Any] = field(default_factory=list)            # ipaddress networks
    ports: frozenset = frozenset()
    port_ranges: Tuple[Tuple[int, int], ...] = ()
    scopes: frozenset = frozenset()
    names: Optional[re.Pattern] = None
    name_patterns: Tuple[str, ...] = ()
    proto: frozenset = frozenset()
    protocols: frozenset = frozenset()
    exe_paths: Optional[re.Pattern] = None
    exe_path_list: Tuple[str, ...] = ()
    basenames: Optional[re.Pattern] = None
    basename_list: Tuple[str, ...] = ()
    identities: Optional[re.Pattern] = None
    args_contain: Tuple[str, ...] = ()
    args_regex: Tuple[Any, ...] = ()       # RE2 patterns (linear time)
    cmdline_regex: Tuple[Any, ...] = ()
    majors: frozenset = frozenset()
    file_classes: frozenset = frozenset()
    file_ops: frozenset = frozenset()
    file_paths: Optional[re.Pattern] = None
    file_path_list: Tuple[str, ...] = ()
    has_file: bool = False
    has_dst: bool = False
    has_exe: bool = False
    groups: frozenset = frozenset()
    unless: Tuple["CompiledMatch", ...] = ()
    # A list written in the rule expanded to nothing (e.g. an empty shared allow-list): the
    # match can never hold. Matching everything instead would turn "allow nothing yet" into
    # "block everything".
    never: bool = False
    # Set on rules the kernel decides (egress allow-lists): a record the kernel checked says
    # which rule it applied (net.policy_rule), and that is the answer; the fields are matched
    # only for records without it (offline replay of older recordings).
    kernel_rule: Optional[str] = None

    def __call__(self, rec: dict) -> bool:
        if self.never:
            return False
        if self.kernel_rule is not None:
            net = rec.get("net")
            if net is not None and "policy_rule" in net:
                return net["policy_rule"] == self.kernel_rule
        if self.groups and ((rec.get("agent") or {}).get("group") or "default") not in self.groups:
            return False
        if self.has_dst or self.proto or self.protocols:
            net = rec.get("net")
            if self.has_dst:
                if not self._dst_ok(rec, net):
                    return False
            if self.proto and (not net or net.get("proto") not in self.proto):
                return False
            if self.protocols:
                fl = rec.get("flow")
                if not fl or fl.get("protocol") not in self.protocols:
                    return False
        if self.has_exe and not self._exe_ok(rec.get("proc")):
            return False
        if self.majors:
            dev = rec.get("device")
            if not dev or dev.get("major") not in self.majors:
                return False
        if self.has_file:
            f = rec.get("file")
            if not f:
                return False
            if self.file_classes and f.get("class") not in self.file_classes:
                return False
            if self.file_ops and f.get("op") not in self.file_ops:
                return False
            if self.file_paths is not None and not self.file_paths.match(f.get("path") or ""):
                return False
        for u in self.unless:
            if u(rec):
                return False
        return True

    def _dst_ok(self, rec: dict, net: Optional[dict]) -> bool:
        # cheap dict/set checks first; the name regex and address parsing last
        dst = net.get("dst") if net else None
        if self.nets or self.ports or self.port_ranges or self.scopes:
            if not dst:
                return False
            if self.scopes and dst.get("scope") not in self.scopes:
                return False
            if self.ports or self.port_ranges:
                p = dst.get("port")
                if p not in self.ports and not any(lo <= (p or -1) <= hi for lo, hi in self.port_ranges):
                    return False
            if self.nets:
                try:
                    a = ipaddress.ip_address(dst.get("addr") or "")
                except ValueError:
                    return False
                if not any(a.version == n.version and a in n for n in self.nets):
                    return False
        if self.names is not None:
            m = self.names.match
            if dst:
                n = dst.get("name")
                if n and m(n.rstrip(".")):
                    return True
            d = rec.get("dns")
            if d:
                q = d.get("query")
                if q and m(q.rstrip(".")):
                    return True
            fl = rec.get("flow")
            det = fl.get("detail") if fl else None
            if det:
                for k in ("sni", "host"):
                    v = det.get(k)
                    if v and m(v.rstrip(".")):
                        return True
            return False
        return True

    def _exe_ok(self, proc: Optional[dict]) -> bool:
        if not proc:
            return False
        exe = proc.get("exe") or ""
        if self.exe_paths is not None and not self.exe_paths.match(exe):
            return False
        ident = proc.get("identity")
        if self.basenames is not None:
            base = exe.rsplit("/", 1)[-1]
            comm = proc.get("comm") or ""
            if not (self.basenames.match(base) or (comm and self.basenames.match(comm))):
                # what the content says the program is (a renamed copy, ld.so, a memfd)
                names = ident.get("names") if isinstance(ident, dict) else None
                if not names or not any(self.basenames.match(n) for n in names):
                    return False
        if self.identities is not None:
            name = ident.get("name") if isinstance(ident, dict) else None
            if not name or not self.identities.match(name):
                return False
        if self.args_contain or self.args_regex or self.cmdline_regex:
            args = proc.get("args") or []
            line = " ".join(args)
            if self.args_contain and not any(s in line for s in self.args_contain):
                return False
            if self.args_regex and not any(r.search(a) for r in self.args_regex for a in args):
                return False
            cre = self.cmdline_regex
            if cre:
                # one combined pattern in practice (compile step): no generator for it
                if len(cre) == 1:
                    if not cre[0].search(line):
                        return False
                elif not any(r.search(line) for r in cre):
                    return False
        return True


@dataclass
class Rule:
    """One validated, compiled rule."""
    id: str
    description: str
    category: str
    severity: str
    on: Tuple[str, ...]
    action: str
    tags: Tuple[str, ...]
    match: Optional[CompiledMatch]
    condition: Optional[CompiledCondition]
    window: Optional[Window]
    dedup_fields: Tuple[str, ...]
    dedup_seconds: float
    message: Optional[str]
    file: str
    line: int
    model: RuleModel
    # "kernel" when the kernel enforces the action from policy maps (block, exec kill by
    # path/basename), "userspace" when the act stage does, "none" for report.
    enforced_in: str = "none"
    # Exact basenames (and their 15-byte comm prefixes) the rule needs, when it needs one:
    # the engine skips the rule with a set lookup instead of running the match.
    gate: Optional[frozenset] = None
    # Literal leading parts of the rule's wildcard exe paths (`/opt/tools/*` -> `/opt/tools/`),
    # when it needs one of them and no gate above applies: proc.exe must start with one, so
    # the engine meets the rule only on execs under those prefixes (not on every exec).
    exe_prefixes: Optional[Tuple[str, ...]] = None
    # What userspace does in enforce mode when a kernel `block` could not be applied to the
    # event (a TLS server name past the hello's first segment): "kill", or None (report).
    fallback: Optional[str] = None


@dataclass
class RuleSet:
    rules: List[Rule]
    lists: Dict[str, List[Any]]
    list_sources: Dict[str, Optional[str]]
    files: List[str]
    egress: Dict[str, Any] = field(default_factory=dict)     # group → EgressPolicy
    by_kind: Dict[str, List[Rule]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.by_kind:
            for r in self.rules:
                for k in r.on:
                    self.by_kind.setdefault(k, []).append(r)

    def get(self, rule_id: str) -> Optional[Rule]:
        for r in self.rules:
            if r.id == rule_id:
                return r
        return None


DEFAULT_DEDUP_FIELDS: Dict[str, Tuple[str, ...]] = {
    "exec": ("proc.exe", "proc.args"),
    "fork": ("proc.exe",),
    "exit": ("proc.exe",),
    "connect": ("net.dst.addr", "net.dst.port"),
    "listen": ("net.local.port",),
    "dns": ("dns.query",),
    "flow": ("net.dst.addr", "net.dst.port", "flow.protocol"),
    "gpu": ("gpu.index",),
    "device": ("device.major", "device.minor"),
    "file": ("file.path", "file.op"),
    "socket": ("socket.family", "socket.type", "socket.protocol"),
    "escape": ("proc.pid", "escape.to.cgroup"),
}

# socket and escape records are matched by kind only (no CEL types for them yet), but their
# fields can be named in messages and dedup keys
_VALID_FIELD_ROOTS = (set(CEL_VARS) - {"lists"}) | {"socket", "escape"}


# --------------------------------------------------------------------------- loading

class _FileCtx:
    def __init__(self, path: str, root: Optional[yaml.Node], text: Optional[str] = None):
        self.path = path
        self.root = root
        self.text = text
        self.rule_index: List[int] = []

    def err(self, loc: Sequence[Any], message: str, rule_id: Optional[str] = None,
            pos: Optional[Tuple[int, int]] = None) -> RuleError:
        if pos is None:
            node, _ = _node_at(self.root, loc)
            pos = _mark(node)
        return RuleError(self.path, pos[0], pos[1], _field_path(loc), message, rule_id)

    def node(self, loc: Sequence[Any], key: bool = False) -> Optional[yaml.Node]:
        n, ok = _node_at(self.root, loc, key)
        return n if ok else None


def _parse_file(path: str, errors: List[RuleError]) -> Tuple[Optional[RuleFile], Optional[_FileCtx]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        errors.append(RuleError(path, 0, 0, "", f"cannot read: {e.strerror or e}"))
        return None, None
    except UnicodeDecodeError as e:
        errors.append(RuleError(path, 0, 0, "", f"not UTF-8 text: {e}"))
        return None, None
    try:
        root, data = _compose_and_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = getattr(e, "problem", None) or str(e)
        ctx = getattr(e, "context", None)
        errors.append(RuleError(path, line, col, "", f"YAML error: {problem}" + (f" ({ctx})" if ctx else "")))
        return None, None
    ctx = _FileCtx(path, root, text)
    if data is None:
        return RuleFile(), ctx
    if not isinstance(data, dict):
        errors.append(ctx.err([], "a rule file is a mapping with 'lists' and/or 'rules'"))
        return None, ctx
    # Validate the file shell and then each rule on its own, so that one bad rule does not
    # hide the problems (CEL, lists, kernel) of its neighbours.
    shell = {k: v for k, v in data.items() if k != "rules"}
    raw_rules = data.get("rules", [])
    ok = True
    try:
        rf = RuleFile.model_validate(shell)
    except ValidationError as ve:
        _report(ve, [], ctx, errors, None)
        rf, ok = RuleFile(), False
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        errors.append(ctx.err(["rules"], "'rules' must be a list of rules"))
        return None, ctx
    good: List[Tuple[int, RuleModel]] = []
    for i, r in enumerate(raw_rules):
        rid = r.get("id") if isinstance(r, dict) and isinstance(r.get("id"), str) else None
        try:
            good.append((i, RuleModel.model_validate(r)))
        except ValidationError as ve:
            _report(ve, ["rules", i], ctx, errors, rid)
    object.__setattr__(rf, "rules", [m for _, m in good])
    ctx.rule_index = [i for i, _ in good]
    return rf, ctx


def _report(ve: ValidationError, prefix: List[Any], ctx: "_FileCtx", errors: List[RuleError],
            rid: Optional[str]) -> None:
    errs = ve.errors()
    paths = [_field_path(prefix + list(e["loc"])) for e in errs]
    done: Dict[str, RuleError] = {}
    for e, path in zip(errs, paths):
        # a union reports every branch it tried; keep the one that got deepest into the input
        if any(o != path and (o.startswith(path + ".") or o.startswith(path + "[")) for o in paths):
            continue
        loc = prefix + list(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown field '{loc[-1]}'"
        elif e["type"] == "missing":
            msg = f"missing required field '{loc[-1]}'"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if path in done:            # same spot, another union branch: one error, both reasons
            done[path].message += f"; or {msg[:1].lower()}{msg[1:]}"
            continue
        done[path] = ctx.err(loc, msg, rid)
        errors.append(done[path])


def _all_text(values: Sequence[Any]) -> Optional[str]:
    """Every value joined by NUL when all are strings, else None: one C pass that lets a long
    list (100,000 allowed names) skip the per-item checks it cannot fail (`"\0$" in` it:
    does any item name a list)."""
    if len(values) < 64:
        return None
    try:
        return "\0" + "\0".join(values) + "\0"
    except TypeError:
        return None


def _expand(values: Sequence[Any], lists: Dict[str, List[Any]], ctx: _FileCtx, loc: List[Any],
            rid: str, errors: List[RuleError], cm: Optional["CompiledMatch"] = None) -> List[Any]:
    joined = _all_text(values)
    if joined is not None and "\0$" not in joined:
        return list(values)
    out: List[Any] = []
    for i, v in enumerate(values):
        if isinstance(v, str) and v.startswith("$"):
            name = v[1:]
            if name not in lists:
                errors.append(ctx.err(loc + [i], f"unknown list '{name}'", rid))
            else:
                out.extend(lists[name])
        else:
            out.append(v)
    if values and not out and cm is not None:
        cm.never = True
    return out


def _compile_match(m: MatchBase, lists: Dict[str, List[Any]], ctx: _FileCtx, loc: List[Any],
                   rid: str, errors: List[RuleError]) -> CompiledMatch:
    cm = CompiledMatch()
    if m.dst is not None:
        d = m.dst
        dl = loc + ["dst"]
        for i, c in enumerate(_expand(d.cidrs, lists, ctx, dl + ["cidrs"], rid, errors, cm)):
            try:
                cm.nets.append(ipaddress.ip_network(str(c), strict=False))
            except ValueError:
                errors.append(ctx.err(dl + ["cidrs", min(i, len(d.cidrs) - 1)], f"not a CIDR: {c!r}", rid))
        ports, ranges = set(), []
        for i, p in enumerate(_expand(d.ports, lists, ctx, dl + ["ports"], rid, errors, cm)):
            if isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536:
                ports.add(p)
            elif isinstance(p, str) and re.fullmatch(r"\d+-\d+", p):
                lo, hi = (int(x) for x in p.split("-"))
                if 0 < lo <= hi < 65536:
                    ranges.append((lo, hi))
                else:
                    errors.append(ctx.err(dl + ["ports", min(i, len(d.ports) - 1)], f"bad port range {p!r}", rid))
            elif isinstance(p, str) and p.isdigit() and 0 < int(p) < 65536:
                ports.add(int(p))
            else:
                errors.append(ctx.err(dl + ["ports", min(i, len(d.ports) - 1)],
                                      f"not a port (1-65535) or range 'lo-hi': {p!r}", rid))
        cm.ports, cm.port_ranges = frozenset(ports), tuple(ranges)
        scopes = _expand(d.scopes, lists, ctx, dl + ["scopes"], rid, errors, cm)
        for i, s in enumerate(scopes):
            if s not in SCOPES:
                errors.append(ctx.err(dl + ["scopes", min(i, len(d.scopes) - 1)],
                                      f"unknown scope {s!r} (one of {', '.join(SCOPES)})", rid))
        cm.scopes = frozenset(scopes)
        names = _expand(d.names, lists, ctx, dl + ["names"], rid, errors, cm)
        joined = _all_text(names)
        if joined is None or joined.lower() != joined or ".\0" in joined:
            names = [_lower(str(n)).rstrip(".") for n in names]
        # else: all lowercase already, none ending in a dot: the same list
        cm.names = _wild(names, icase=True)
        cm.name_patterns = tuple(names)
        cm.has_dst = bool(cm.nets or cm.ports or cm.port_ranges or cm.scopes or cm.names)
    cm.proto = frozenset(m.proto)
    protocols = _expand(m.protocols, lists, ctx, loc + ["protocols"], rid, errors, cm)
    for i, p in enumerate(protocols):
        if p not in FLOW_PROTOCOLS:
            errors.append(ctx.err(loc + ["protocols", min(i, len(m.protocols) - 1)],
                                  f"unknown protocol {p!r} (one of {', '.join(FLOW_PROTOCOLS)})", rid))
    cm.protocols = frozenset(protocols)
    if m.exe is not None:
        e = m.exe
        el = loc + ["exe"]
        paths = [str(x) for x in _expand(e.paths, lists, ctx, el + ["paths"], rid, errors, cm)]
        cm.exe_paths, cm.exe_path_list = _wild(paths), tuple(paths)
        bases = [str(x) for x in _expand(e.basenames, lists, ctx, el + ["basenames"], rid, errors, cm)]
        cm.basenames, cm.basename_list = _wild(bases), tuple(bases)
        cm.identities = _wild([str(x) for x in _expand(e.identities, lists, ctx, el + ["identities"], rid, errors, cm)])
        cm.args_contain = tuple(str(x) for x in _expand(e.args_contain, lists, ctx, el + ["args_contain"], rid, errors, cm))
        for key in ("args_regex", "cmdline_regex"):
            pats = [str(x) for x in _expand(getattr(e, key), lists, ctx, el + [key], rid, errors, cm)]
            good = []
            for i, p in enumerate(pats):
                # agent-controlled text: linear time or a load error (tracer/match/linregex.py)
                try:
                    good.append(compile_linear(p))
                except LinearRegexError as ex:
                    errors.append(ctx.err(el + [key, min(i, len(getattr(e, key)) - 1)], f"bad regex {p!r}: {ex}", rid))
            # each pattern may carry its own inline flags such as (?i); RE2 scopes them to the
            # group, so one alternation means the same as trying each in turn, and one search
            # instead of one per pattern is what an exec of anything pays
            if len(good) > 1:
                try:
                    good = [_combined(good)]
                except Exception:   # pragma: no cover - RE2 took each alone
                    pass
            setattr(cm, key, tuple(Searcher(g) for g in good))
        cm.has_exe = bool(cm.exe_paths or cm.basenames or cm.identities or cm.args_contain or cm.args_regex
                          or cm.cmdline_regex)
    if m.device is not None:
        cm.majors = frozenset(m.device.majors)
    if m.file is not None:
        fl = loc + ["file"]
        for key, allowed in (("classes", FILE_CLASSES), ("ops", FILE_OPS)):
            vals = [str(x) for x in _expand(getattr(m.file, key), lists, ctx, fl + [key], rid, errors, cm)]
            for i, v in enumerate(vals):
                if v not in allowed:
                    errors.append(ctx.err(fl + [key, min(i, len(getattr(m.file, key)) - 1)],
                                          f"unknown file {key[:-1] if key == 'ops' else 'class'} {v!r} "
                                          f"(one of {', '.join(allowed)})", rid))
            setattr(cm, "file_" + key, frozenset(vals))
        paths = [str(x) for x in _expand(m.file.paths, lists, ctx, fl + ["paths"], rid, errors, cm)]
        cm.file_paths, cm.file_path_list = _wild(paths), tuple(paths)
        cm.has_file = bool(cm.file_classes or cm.file_ops or cm.file_paths is not None)
    cm.groups = frozenset(m.groups)
    if isinstance(m, Match) and m.unless is not None:
        if isinstance(m.unless, list):
            cm.unless = tuple(_compile_match(u, lists, ctx, loc + ["unless", i], rid, errors)
                              for i, u in enumerate(m.unless))
        else:
            cm.unless = (_compile_match(m.unless, lists, ctx, loc + ["unless"], rid, errors),)
    return cm


# Kinds whose records carry what each match group looks at.
_GROUP_KINDS = {
    "dst": {"connect", "flow", "dns"},
    "proto": {"connect", "flow", "listen"},
    "protocols": {"flow"},
    "exe": set(EVENT_KINDS),
    "device": {"device"},
    "file": {"file"},
}


def _check_match_kinds(m: MatchBase, on: Sequence[str], ctx: _FileCtx, loc: List[Any], rid: str,
                       errors: List[RuleError]) -> None:
    for group, kinds in _GROUP_KINDS.items():
        val = getattr(m, group)
        if not val:
            continue
        if group == "dst" and set(on) == {"dns"}:
            if m.dst.cidrs or m.dst.ports or m.dst.scopes:
                errors.append(ctx.err(loc + ["dst"], "dns events only carry a query name: use dst.names", rid))
            continue
        bad = [k for k in on if k not in kinds]
        if bad:
            errors.append(ctx.err(loc + [group], f"match.{group} never applies to events of kind "
                                  f"{', '.join(bad)} (it applies to {', '.join(sorted(kinds))})", rid))


def kernel_block_problems(model: RuleModel) -> List[Tuple[List[Any], str]]:
    """Why a `block` rule cannot be held in kernel maps (empty list: it can).

    The kernel sees a connect's destination address/port/protocol (cgroup connect hooks), a
    flow's first payload bytes (ssh/stratum banners). Names, command lines, CEL and windows
    live only in userspace, so a `block` using them would be a silent downgrade to reporting.
    Device numbers are seen by cgroup/dev, but that hook holds the GPU fence only (per-agent
    deny of GPU majors, from the config's `gpu:` section): a rule's device `block` has no map
    to live in, so it is refused here rather than accepted and never enforced."""
    probs: List[Tuple[List[Any], str]] = []
    hint = "; use action 'kill' (userspace) or 'report'"
    if "device" in model.on:
        probs.append((["on"], "the kernel device hook holds only the GPU fence: deny GPUs with the "
                              "config's gpu: policy (or run --gpu deny) and use action 'report' here"))
    if model.condition is not None:
        probs.append((["condition"], "a CEL condition cannot be evaluated in the kernel" + hint))
    if model.window is not None:
        probs.append((["window"], "a window cannot be counted in the kernel" + hint))
    m = model.match
    if m is None:
        probs.append((["action"], "'block' needs a match (destination, protocol or device)"))
        return probs
    if m.unless is not None:
        probs.append((["match", "unless"], "exceptions ('unless') cannot be held in kernel maps" + hint))
    if m.exe is not None:
        probs.append((["match", "exe"], "'block' cannot select by executable; use action 'kill' for exec rules"))
    if m.dst is not None and m.dst.names:
        if sni_block(model):
            # a TLS server name is in the ClientHello's first segment: probes/tls.c holds
            # exact names and *.suffix, and nothing else of dst alongside them
            if m.dst.cidrs or m.dst.ports or m.dst.scopes:
                probs.append((["match", "dst"], "the kernel's TLS server-name check holds names only: "
                                                "drop dst.cidrs, dst.ports and dst.scopes, or split the rule"))
        else:
            probs.append((["match", "dst", "names"], "the kernel sees addresses, not names (except a TLS "
                                                     "server name: on [flow] with protocols [tls])" + hint))
    for k in model.on:
        if k == "connect":
            if not (m.dst and (m.dst.cidrs or m.dst.ports or m.dst.scopes)):
                probs.append((["match"], "'block' on connect needs dst.cidrs, dst.ports or dst.scopes"))
        elif k == "flow":
            if not m.protocols:
                probs.append((["match"], "'block' on flow needs match.protocols"))
        elif k == "device":
            pass    # refused above
        else:
            probs.append((["on"], f"'block' cannot act on {k} events (the kernel blocks connects and flows)"))
    return probs


def sni_block(model: RuleModel) -> bool:
    """A `block` on TLS server names: on [flow], protocols [tls], dst.names. The kernel drops
    the ClientHello when its first segment holds the name (probes/tls.c); when it does not (a
    hello split before the name), userspace kills the process: `Rule.fallback`."""
    m = model.match
    return (model.action == "block" and list(model.on) == ["flow"] and m is not None
            and list(m.protocols) == ["tls"] and m.dst is not None and bool(m.dst.names))


def _kernel_file_kill(model: RuleModel) -> bool:
    """A file kill decided in the kernel: `on: [file]`, match.file with classes (and
    optionally ops) only; paths, exe, CEL, windows and exceptions live in userspace."""
    m = model.match
    if model.action != "kill" or list(model.on) != ["file"] or m is None or m.file is None:
        return False
    if model.condition or model.window or m.unless or m.dst or m.proto or m.protocols or m.device or m.exe:
        return False
    if m.groups or m.file.paths or not m.file.classes:
        return False
    return "unknown" not in m.file.classes


def _kernel_kill(model: RuleModel) -> bool:
    """An exec kill decided in the kernel: only exact paths/basenames, nothing userspace-only."""
    m = model.match
    if _kernel_file_kill(model):
        return True
    if model.action != "kill" or list(model.on) != ["exec"] or m is None:
        return False
    if model.condition or model.window or m.unless or m.dst or m.proto or m.protocols or m.device:
        return False
    e = m.exe
    if e is None or not (e.paths or e.basenames):
        return False
    if e.args_contain or e.args_regex or e.cmdline_regex or e.identities:
        return False
    return not any(_is_wild(str(x)) for x in list(e.paths) + list(e.basenames) if not str(x).startswith("$"))


def _check_field_path(path: str) -> Optional[str]:
    parts = path.split(".")
    if parts[0] not in _VALID_FIELD_ROOTS or not all(parts):
        return f"field path {path!r} must start with one of {', '.join(sorted(_VALID_FIELD_ROOTS))}"
    return None


@contextmanager
def gc_paused():
    """No cyclic garbage collection inside: loading builds tens of thousands of objects and
    none of them is garbage until it ends, yet each allocation burst let the collector walk
    the whole young heap again (~40% of loading 500 rules). Collection resumes after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def load_rules(paths: Iterable[Union[str, os.PathLike]], egress: Optional[Dict[str, Any]] = None,
               egress_origin: Optional[Tuple[str, Dict[str, int]]] = None) -> RuleSet:
    """Load, validate and compile rule files (or directories of *.yaml) into one RuleSet.

    `egress` maps an agent group name to an `agenttrace.match.policy.EgressPolicy` (from the
    config file); each becomes rules named `egress-policy.<group>...` in the set.
    Raises RulesError listing every problem. The caller swaps the result in atomically, so a
    failed reload leaves the running rules untouched."""
    with gc_paused():
        return _load_rules(paths, egress, egress_origin)


def _load_rules(paths, egress, egress_origin) -> RuleSet:
    files = expand_paths(paths)
    errors: List[RuleError] = []
    if not files and not egress:     # an egress policy alone (run --no-rules --allow-egress) is a rule set
        raise RulesError([RuleError("<none>", 0, 0, "", "no rule files given")])
    parsed: List[Tuple[RuleFile, _FileCtx]] = []
    for f in files:
        rf, ctx = _parse_file(f, errors)
        if rf is not None and ctx is not None:
            parsed.append((rf, ctx))

    lists: Dict[str, List[Any]] = {}
    sources: Dict[str, Optional[str]] = {}
    list_home: Dict[str, str] = {}
    for rf, ctx in parsed:
        for name, ld in rf.lists.items():
            if name in lists:
                errors.append(ctx.err(["lists", name], f"list '{name}' already defined in {list_home[name]}"))
                continue
            items = ld.items if isinstance(ld, ListDef) else ld
            lists[name] = list(items)
            sources[name] = ld.source if isinstance(ld, ListDef) else None
            list_home[name] = ctx.path

    check_env = eval_env = None
    try:
        check_env, eval_env = cel_envs()
    except Exception as e:  # missing CEL library: conditions become errors, not silent passes
        cel_problem = f"CEL library unavailable: {e}"
    else:
        cel_problem = None

    rules: List[Rule] = []
    seen_ids: Dict[str, str] = {}
    envs = (check_env, eval_env, cel_problem)
    for rf, ctx in parsed:
        for pos, rm in enumerate(rf.rules):
            idx = ctx.rule_index[pos] if pos < len(ctx.rule_index) else pos
            r = _compile_rule(rm, ["rules", idx], ctx, lists, errors, envs, seen_ids)
            if r is not None:
                rules.append(r)
    if egress:

        ectx = _FileCtx("<config: egress>", None)
        for i, rm in enumerate(egress_rule_models(egress)):
            r = _compile_rule(rm, ["egress", i], ectx, lists, errors, envs, seen_ids, kernel_trusted=True)
            if r is not None and egress_origin is not None:
                # a group's rules point at its `egress.<group>` line in the config file, so an
                # error about them (the kernel cannot hold it) names the file and line to edit
                path, lines = egress_origin
                line = max(((len(g), n) for g, n in lines.items()
                            if r.id.startswith(f"egress-policy.{_safe_group_id(g)}.")), default=(0, 0))[1]
                r.file, r.line = path, line
            if r is not None:
                if r.match is not None and r.id.endswith(".allow-list"):
                    r.match.kernel_rule = r.id
                rules.append(r)
    if errors:
        raise RulesError(errors)
    return RuleSet(rules=rules, lists=lists, list_sources=sources, files=files, egress=dict(egress or {}))


def _compile_rule(rm: RuleModel, loc: List[Any], ctx: _FileCtx, lists: Dict[str, List[Any]],
                  errors: List[RuleError], envs: Tuple[Any, Any, Optional[str]],
                  seen_ids: Dict[str, str], kernel_trusted: bool = False) -> Optional[Rule]:
    check_env, eval_env, cel_problem = envs
    rid = rm.id
    start = len(errors)
    if rid in seen_ids:
        errors.append(ctx.err(loc + ["id"], f"duplicate rule id (first defined at {seen_ids[rid]})", rid))
    else:
        seen_ids[rid] = f"{ctx.path}:{_mark(ctx.node(loc + ['id']))[0]}"
    cm = None
    if rm.match is not None:
        _check_match_kinds(rm.match, rm.on, ctx, loc + ["match"], rid, errors)
        cm = _compile_match(rm.match, lists, ctx, loc + ["match"], rid, errors)
    cond = None
    if rm.condition is not None:
        cnode = ctx.node(loc + ["condition"])
        if cel_problem:
            errors.append(ctx.err(loc + ["condition"], cel_problem, rid))
        else:
            try:
                rt_name, prog = _cel_compiled(rm.condition, check_env, eval_env)
                if rt_name not in ("bool", "BOOL", "dyn", "DYN"):
                    errors.append(ctx.err(loc + ["condition"], f"condition must be a bool, it is {rt_name}", rid))
                used = referenced_vars(rm.condition)
                missing: Dict[str, List[str]] = {}
                for k in rm.on:
                    have = set(COMMON_VARS) | set(KIND_SECTIONS.get(k, ())) | {"lists"}
                    for v in used:
                        if v not in have:
                            missing.setdefault(v, []).append(k)
                for v, ks in missing.items():
                    errors.append(ctx.err(loc + ["condition"], f"condition uses '{v}', which {', '.join(ks)} events do not carry", rid))
                used_lists = {}
                for lref in re.findall(r"\blists\.([A-Za-z_]\w*)", _STRLIT.sub("''", rm.condition)):
                    if lref not in lists:
                        errors.append(ctx.err(loc + ["condition"], f"unknown list 'lists.{lref}'", rid))
                    else:
                        used_lists[lref] = lists[lref]
                if re.search(r"\blists\s*\[", rm.condition):
                    used_lists = dict(lists)      # lists["name"] indexing: hand over all of them
                cond = CompiledCondition(rm.condition, prog, used, used_lists)
            except Exception as e:
                for line, col, text in _cel_errors(cnode, str(e), ctx.text):
                    errors.append(ctx.err(loc + ["condition"], f"CEL: {text}", rid, pos=(line, col)))
    if rm.window is not None:
        for f in rm.window.distinct_fields():
            p = _check_field_path(f)
            if p:
                errors.append(ctx.err(loc + ["window", "distinct"], p, rid))
    if rm.message is not None:
        for ref in re.findall(r"\{([^{}]*)\}", rm.message):
            if ref.startswith("window."):
                if rm.window is None or ref[7:] not in ("count", "threshold", "seconds", "fields"):
                    errors.append(ctx.err(loc + ["message"], f"unknown placeholder {{{ref}}}", rid))
                continue
            p = _check_field_path(ref) if re.fullmatch(r"[a-z_][\w.]*", ref) else f"bad placeholder {{{ref}}}"
            if p:
                errors.append(ctx.err(loc + ["message"], p, rid))
    dd_fields: Tuple[str, ...]
    if rm.dedup is not None and rm.dedup.fields is not None:
        dd_fields = tuple(rm.dedup.fields)
        for f in dd_fields:
            p = _check_field_path(f)
            if p:
                errors.append(ctx.err(loc + ["dedup", "fields"], p, rid))
    else:
        dd_fields = tuple(dict.fromkeys(f for k in rm.on for f in DEFAULT_DEDUP_FIELDS.get(k, ())))
    enforced = "none"
    if rm.action == "block":
        if not kernel_trusted:
            for ploc, msg in kernel_block_problems(rm):
                errors.append(ctx.err(loc + ploc, f"'block' the kernel cannot hold: {msg}", rid))
        enforced = "kernel"
        if cm is not None and "flow" in rm.on:
            held = set(KERNEL_PROTOCOLS) | ({"tls"} if sni_block(rm) else set())
            for p in sorted(cm.protocols - held):
                errors.append(ctx.err(loc + ["match", "protocols"], f"'block' the kernel cannot hold: the kernel "
                                      f"can only recognise {', '.join(KERNEL_PROTOCOLS)}, not {p!r}", rid))
    elif rm.action == "kill":
        enforced = "kernel" if _kernel_kill(rm) else "userspace"
        # list items spliced in may carry wildcards the kernel cannot compare
        if cm is not None and any(_is_wild(x) for x in cm.basename_list + cm.exe_path_list):
            enforced = "userspace"
    elif rm.action in ("kill-agent", "freeze-agent"):
        enforced = "userspace"
    if len(errors) > start or not rm.enabled:
        return None
    gate = None
    if cm is not None and cm.basename_list and not cm.never and not any(_is_wild(b) for b in cm.basename_list):
        gate = frozenset(cm.basename_list) | frozenset(b[:15] for b in cm.basename_list)
    elif cm is not None and cm.exe_path_list and not cm.never and not any(_is_wild(p) for p in cm.exe_path_list):
        # exact exe paths: proc.exe must be one of them, so its basename must be one of theirs;
        # the engine then meets this rule only on execs of those names
        bases = {p.rsplit("/", 1)[-1] for p in cm.exe_path_list}
        gate = frozenset(bases) | frozenset(b[:15] for b in bases)
    exe_prefixes = None
    if gate is None and cm is not None and cm.exe_path_list and not cm.never:
        pre = tuple(dict.fromkeys(_literal_prefix(p) for p in cm.exe_path_list))
        # a pattern that starts with a wildcard (or only "/") can match any exe: no prefix
        if all(len(x) > 1 for x in pre):
            exe_prefixes = pre
    return Rule(
        id=rid, description=rm.description, category=rm.category, severity=rm.severity,
        on=tuple(dict.fromkeys(rm.on)), action=rm.action, tags=tuple(rm.tags), match=cm,
        condition=cond, window=rm.window, dedup_fields=dd_fields,
        dedup_seconds=rm.dedup.seconds if rm.dedup else 60.0, message=rm.message,
        file=ctx.path, line=_mark(ctx.node(loc))[0], model=rm, enforced_in=enforced, gate=gate,
        exe_prefixes=exe_prefixes,
        fallback="kill" if sni_block(rm) else None)


def lint(paths: Iterable[Union[str, os.PathLike]], egress: Optional[Dict[str, Any]] = None) -> List[RuleError]:
    """Every problem in the given rule files (empty list: they load)."""
    try:
        load_rules(paths, egress)
    except RulesError as e:
        return e.errors
    return []
