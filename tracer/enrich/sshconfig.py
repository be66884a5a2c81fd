"""What an OpenSSH client will really do: forwarding, proxy and jump decided the way ssh(1)
decides them, from its command line and the configuration files it reads.

A regex over argv misses `ssh -F cfg host` whose cfg says `RemoteForward`, a `~/.ssh/config`
Host block, an `Include`d file, or `-o "  RemoteForward=…"` spelt in a way the regex does not
expect. `interpret(argv, ...)` parses argv with ssh's own option letters (options may follow
the destination, as ssh allows), then reads `-F FILE` — or the user's `~/.ssh/config` and
`/etc/ssh/ssh_config` — following `Include` (globs, relative to ~/.ssh or /etc/ssh) and
honouring `Host` / `Match` blocks for the destination, with ssh's precedence: command line
first, then the first value obtained for each keyword; forwardings accumulate.

Files are read through `/proc/PID/root` and relative paths through `/proc/PID/cwd` when a pid
is given, so an agent in its own mount namespace is read as it sees itself. `Match exec` and
other criteria this module cannot evaluate count as matching: the answer errs towards "may
forward", and `uncertain` says so.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import os
import pwd
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

# OpenSSH 9.x ssh.c getopt string: letters followed by ':' take an argument
_OPTSTRING = "1246ab:c:e:fgi:kl:m:no:p:qstvxAB:CD:E:F:GI:J:KL:MNO:P:Q:R:S:TVw:W:XYy"
_WITH_ARG = {c for i, c in enumerate(_OPTSTRING) if c != ":" and i + 1 < len(_OPTSTRING) and _OPTSTRING[i + 1] == ":"}
_FLAGS = {c for c in _OPTSTRING if c != ":"} - _WITH_ARG

_FORWARD_KEYS = {"remoteforward": "remote", "localforward": "local", "dynamicforward": "dynamic"}
_SINGLE_KEYS = {"proxycommand", "proxyjump", "tunnel", "tunneldevice", "controlmaster", "controlpath",
                "hostname", "port", "user", "clearallforwardings", "localcommand", "permitlocalcommand",
                "sessiontype", "forwardagent", "gatewayports", "exitonforwardfailure"}
MAX_INCLUDE_DEPTH = 16        # ssh's own limit
MAX_FILE_BYTES = 1 << 20


@dataclass
class SshPlan:
    """What the client will do. `forwards`: {"remote"|"local"|"dynamic"|"stdio"|"tun": [spec]}."""
    host: Optional[str] = None
    forwards: Dict[str, List[str]] = field(default_factory=dict)
    options: Dict[str, str] = field(default_factory=dict)   # first value of each keyword of interest
    config_files: List[str] = field(default_factory=list)
    sources: Dict[str, str] = field(default_factory=dict)   # forward kind / option → "argv" or file:line
    control: Optional[str] = None                           # -O command (forward, cancel, exit, ...)
    uncertain: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    @property
    def proxy_command(self) -> Optional[str]:
        v = self.options.get("proxycommand")
        return None if v is None or v.lower() == "none" else v

    @property
    def proxy_jump(self) -> Optional[str]:
        v = self.options.get("proxyjump")
        return None if v is None or v.lower() == "none" else v

    @property
    def forwarding(self) -> bool:
        return any(self.forwards.values())

    def record(self) -> dict:
        """The `proc.ssh` part of an exec record."""
        out: dict = {"host": self.host, "forwarding": self.forwarding,
                     "proxy": bool(self.proxy_command or self.proxy_jump)}
        for k, v in self.forwards.items():
            if v:
                out.setdefault("forwards", {})[k] = v[:16]
        if self.proxy_command:
            out["proxy_command"] = self.proxy_command[:512]
        if self.proxy_jump:
            out["proxy_jump"] = self.proxy_jump[:256]
        if self.control:
            out["control"] = self.control
        out["tunnel"] = self.forwarding or out["proxy"]
        # what decided it: option letters (-R/-L/-D/-W/-w/-J, which argv regexes read well),
        # -o options (free spellings) or configuration files (invisible in argv)
        keys = [k for k, v in self.forwards.items() if v]
        keys += [k for k in ("proxycommand", "proxyjump") if getattr(self, k.replace("proxy", "proxy_"))]
        how = set()
        for k in keys:
            src = self.sources.get(k, "argv")
            how.add("flags" if src == "argv" else "options" if src == "argv:-o" else "config")
        out["decided_by"] = sorted(how)
        out["sources"] = {k: self.sources[k] for k in keys if k in self.sources}
        if self.config_files:
            out["config_files"] = self.config_files[:16]
        if self.uncertain:
            out["uncertain"] = self.uncertain[:8]
        return out


def _split_opt(text: str):
    """`Keyword value`, `Keyword=value` or `  Keyword = value` → (keyword lower, value)."""
    t = text.strip()
    if not t:
        return None, ""
    key, val = t, ""
    for i, ch in enumerate(t):
        if ch in " \t=":
            key, val = t[:i], t[i:].lstrip(" \t")
            if val.startswith("="):
                val = val[1:].lstrip(" \t")
            break
    return key.lower(), val.strip()


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1]
    return v


def _host_matches(patterns: Sequence[str], host: str) -> bool:
    """ssh's pattern lists: any positive match and no negated match (case-insensitive)."""
    hit = False
    h = host.lower()
    for p in patterns:
        for q in p.split(","):
            q = q.strip().lower()
            if not q:
                continue
            if q.startswith("!"):
                if fnmatch.fnmatchcase(h, q[1:]):
                    return False
            elif fnmatch.fnmatchcase(h, q):
                hit = True
    return hit


class _Reader:
    def __init__(self, plan: SshPlan, pid: Optional[int], host: str, user: str, home: str):
        self.plan, self.pid, self.host, self.user, self.home = plan, pid, host, user, home

    def path(self, p: str) -> str:
        """A path as the traced process sees it."""
        if self.pid is None:
            return p
        if p.startswith("/"):
            return f"/proc/{self.pid}/root{p}"
        return f"/proc/{self.pid}/cwd/{p}"

    def expand(self, p: str, base: str) -> str:
        p = _unquote(p)
        if p.startswith("~/"):
            p = os.path.join(self.home, p[2:])
        elif p == "~":
            p = self.home
        if not p.startswith("/"):
            p = os.path.join(base, p)
        return p

    def read_file(self, path: str, base: str, depth: int, active: bool) -> None:
        if depth > MAX_INCLUDE_DEPTH:
            self.plan.errors.append(f"{path}: Include nested deeper than {MAX_INCLUDE_DEPTH}")
            return
        try:
            with open(self.path(path), "rb") as f:
                text = f.read(MAX_FILE_BYTES).decode("utf-8", "replace")
        except OSError:
            return
        self.plan.config_files.append(path)
        block_active = active
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, val = _split_opt(line)
            if key == "host":
                block_active = active and _host_matches(val.split(), self.host)
                continue
            if key == "match":
                block_active = active and self._match(val, f"{path}:{n}")
                continue
            if key == "include":
                for pat in shlex.split(val) if val else []:
                    full = self.expand(pat, base)
                    hits = sorted(glob.glob(self.path(full)))
                    prefix = self.path("")[:-1] if self.pid is not None else ""
                    for h in hits:
                        real = h[len(prefix):] if prefix and h.startswith(prefix) else h
                        self.read_file(real, base, depth + 1, block_active)
                continue
            if block_active:
                self.plan_option(key, val, f"{path}:{n}")

    def _match(self, criteria: str, where: str) -> bool:
        words = shlex.split(criteria) if criteria else []
        i = 0
        ok = True
        while i < len(words):
            w = words[i].lower()
            neg = w.startswith("!")
            w = w.lstrip("!")
            if w in ("all", "canonical", "final"):
                i += 1
                continue
            arg = words[i + 1] if i + 1 < len(words) else ""
            i += 2
            if w in ("host", "originalhost"):
                r = _host_matches(arg.split(","), self.host)
            elif w in ("user", "localuser"):
                r = _host_matches(arg.split(","), self.user)
            else:  # exec, localnetwork, tagged, ...: cannot be decided here
                self.plan.uncertain.append(f"{where}: Match {w} assumed to hold")
                r = True
            ok = ok and (r != neg)
        return ok

    def plan_option(self, key: str, val: str, source: str) -> None:
        plan = self.plan
        if key in _FORWARD_KEYS:
            kind = _FORWARD_KEYS[key]
            plan.forwards.setdefault(kind, []).append(val)
            plan.sources.setdefault(kind, source)
        elif key in _SINGLE_KEYS and key not in plan.options:
            plan.options[key] = _unquote(val)
            plan.sources.setdefault(key, source)


def parse_argv(argv: Sequence[str]) -> tuple:
    """(options [(letter, value)], host, command) the way ssh's getopt loop reads argv."""
    opts: List[tuple] = []
    host = None
    i = 1
    n = len(argv)
    while i < n:
        a = argv[i]
        if a == "--":
            i += 1
            if host is None and i < n:
                host = argv[i]
                i += 1
            break
        if a.startswith("-") and len(a) > 1:
            j = 1
            while j < len(a):
                c = a[j]
                if c in _WITH_ARG:
                    val = a[j + 1:]
                    if not val:
                        i += 1
                        val = argv[i] if i < n else ""
                    opts.append((c, val))
                    break
                opts.append((c, ""))
                j += 1
            i += 1
            continue
        if host is None:
            host = a
            i += 1
            continue    # ssh goes on parsing options after the destination
        break
    return opts, host, list(argv[i:])


def _dest_host(dest: Optional[str]) -> tuple:
    """(user, host, port) from `user@host`, `ssh://user@host:port`."""
    if not dest:
        return None, None, None
    user = port = None
    d = dest
    if d.startswith("ssh://"):
        d = d[6:]
        if "@" in d:
            user, d = d.rsplit("@", 1)
        if d.startswith("["):
            h, _, rest = d[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else None
            return user, h, port
        if d.count(":") == 1:
            d, port = d.split(":")
        return user, d, port
    if "@" in d:
        user, d = d.rsplit("@", 1)
    return user, d, port


@functools.lru_cache(maxsize=256)
def _account(uid: int) -> tuple:
    """(home, user name) of a uid, as ssh takes them from the password database (not $HOME)."""
    try:
        pw = pwd.getpwuid(uid)
        return pw.pw_dir, pw.pw_name
    except (KeyError, OverflowError):
        return "/nonexistent", ""


def interpret(argv: Sequence[str], pid: Optional[int] = None, uid: Optional[int] = None,
              home: Optional[str] = None, system_config: str = "/etc/ssh/ssh_config") -> SshPlan:
    plan = SshPlan()
    opts, dest, command = parse_argv(argv)
    user, host, _ = _dest_host(dest)
    plan.host = host
    cfgfile = None
    letter_forward = {"R": "remote", "L": "local", "D": "dynamic", "W": "stdio", "w": "tun"}
    for c, v in opts:
        if c in letter_forward:
            plan.forwards.setdefault(letter_forward[c], []).append(v)
            plan.sources.setdefault(letter_forward[c], "argv")
        elif c == "J":
            plan.options.setdefault("proxyjump", v)
            plan.sources.setdefault("proxyjump", "argv")
        elif c == "F":
            cfgfile = v
        elif c == "O":
            plan.control = v
        elif c == "l":
            user = user or v
    pw_home, local_user = _account(uid if uid is not None else os.getuid())
    if home is None:
        home = pw_home
    r = _Reader(plan, pid, host or "", user or local_user, home)
    # -o options come first: on the command line they win over every file
    for c, v in opts:
        if c == "o":
            key, val = _split_opt(v)
            if key:
                r.plan_option(key, val, "argv:-o")
    ssh_dir = os.path.join(home, ".ssh")
    if cfgfile is not None:
        if cfgfile.lower() != "none":
            path = r.expand(cfgfile, ".") if cfgfile.startswith("~") else cfgfile
            r.read_file(path, ssh_dir, 0, True)
    else:
        r.read_file(os.path.join(ssh_dir, "config"), ssh_dir, 0, True)
        r.read_file(system_config, os.path.dirname(system_config), 0, True)
    if plan.options.get("clearallforwardings", "").lower() == "yes":
        plan.forwards.clear()
    t = plan.options.get("tunnel", "no").lower()
    if t in ("yes", "point-to-point", "ethernet") and "tun" not in plan.forwards:
        plan.forwards["tun"] = [plan.options.get("tunneldevice", "any:any")]
        plan.sources.setdefault("tun", plan.sources.get("tunnel", "argv"))
    if plan.control and plan.control.lower() != "forward" and plan.control.lower() != "proxy":
        plan.forwards.clear()   # -O check/exit/stop/cancel asks the master, opens nothing new
    return plan


class SshSessions:
    """Per-node memory of OpenSSH clients seen exec'ing: adds `proc.ssh` to their exec records
    and remembers those that run a ProxyCommand / ProxyJump, so a connect made by one of their
    descendants (the proxy command is ssh's child) is known as that session's relay."""

    def __init__(self, max_entries: int = 4096):
        from collections import OrderedDict
        self.proxies: "OrderedDict[int, dict]" = OrderedDict()
        self.max_entries = max_entries
        self.errors = 0

    @staticmethod
    def is_ssh(exe: str, proc: dict) -> bool:
        if (exe or "").rsplit("/", 1)[-1] == "ssh":
            return True
        ident = proc.get("identity")
        return isinstance(ident, dict) and ident.get("name") == "openssh-client"

    def on_exec(self, pid: int, uid: int, exe: str, args: list, proc: dict) -> None:
        self.proxies.pop(pid, None)   # a pid that execs something else is no longer that ssh
        if not args or not self.is_ssh(exe, proc):
            return
        plan = interpret(args, pid=pid, uid=uid)
        proc["ssh"] = plan.record()
        if plan.proxy_command or plan.proxy_jump or "stdio" in plan.forwards:
            self.proxies[pid] = {"pid": pid, "host": plan.host,
                                 "proxy": (plan.proxy_command or f"ProxyJump {plan.proxy_jump}")[:256]
                                 if (plan.proxy_command or plan.proxy_jump) else "-W"}
            if len(self.proxies) > self.max_entries:
                self.proxies.popitem(last=False)

    def relay_of(self, proc: dict) -> Optional[dict]:
        """The proxying ssh session a process belongs to (itself excluded), if any."""
        for a in proc.get("ancestry") or ():
            hit = self.proxies.get(a.get("pid"))
            if hit is not None:
                return dict(hit)
        return None
