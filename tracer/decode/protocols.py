"""What a TCP flow *is*, from its first payload bytes — never from its port or the process name.

The kernel hands us up to 256 bytes per direction (``AT_FLOW_BYTES``), so every parser here
tolerates truncation: it reports what the captured bytes contain and says ``truncated`` when
a structure ran past them. All functions are pure; the only input is bytes.

``classify(data, direction) -> (protocol, detail)`` with protocol one of ``ssh``, ``stratum``,
``tls``, ``http``, ``unknown`` (the record contract (tracer/schema/event.schema.json), ``flow.protocol`` / ``flow.detail``).
"""
from __future__ import annotations

import json
import re
from typing import Union

SSH, STRATUM, TLS, HTTP, UNKNOWN = "ssh", "stratum", "tls", "http", "unknown"
PROTOCOLS = (SSH, STRATUM, TLS, HTTP, UNKNOWN)

# Values of at_flow.proto_hint (AT_PROTO_* in probes/agenttrace.h).
PROTO_HINT_NAMES = {0: UNKNOWN, 1: SSH, 2: STRATUM, 3: TLS, 4: HTTP}
PROTO_HINT_IDS = {v: k for k, v in PROTO_HINT_NAMES.items()}

EGRESS, INGRESS = "egress", "ingress"
_DIRS = {0: EGRESS, 1: INGRESS, EGRESS: EGRESS, INGRESS: INGRESS}

Direction = Union[str, int]

# Strings we copy out of agent-controlled bytes are capped so one flow cannot bloat a record.
_MAX_STR = 256


def _text(b: bytes, limit: int = _MAX_STR) -> str:
    # backslashreplace keeps the bytes recoverable and the record valid JSON; control
    # characters are left for the human-facing sink to escape.
    return b[:limit].decode("utf-8", errors="backslashreplace")


def _direction(direction: Direction) -> str:
    try:
        return _DIRS[direction]
    except KeyError:
        raise ValueError(f"direction must be 'egress'/'ingress' or 0/1, not {direction!r}") from None


def classify(data: bytes, direction: Direction = EGRESS) -> tuple[str, dict]:
    """Classify the first payload bytes of one direction of a TCP flow.

    ``direction`` is ``egress`` (bytes the agent sent) or ``ingress`` (bytes it received), or
    the kernel's AT_DIR_* value. Returns ``(protocol, detail)``; detail always carries
    ``role`` (client/server side that sent the bytes) for recognised protocols.
    """
    d = _direction(direction)
    data = bytes(data)
    if not data:
        return UNKNOWN, {}
    for parser in (parse_ssh, parse_tls, parse_http, parse_stratum):
        detail = parser(data, d)
        if detail is not None:
            return detail.pop("_protocol"), detail
    return UNKNOWN, {"first_bytes": data[:16].hex(), "length": len(data)}


# -- SSH (RFC 4253 §4.2) ---------------------------------------------------------------------------

_SSH_ID = re.compile(rb"SSH-(?P<proto>[0-9.]+)-(?P<soft>[^ \r\n-][^ \r\n]*)(?: (?P<comments>[^\r\n]*))?(?P<end>\r?\n)?")


def parse_ssh(data: bytes, direction: str = EGRESS) -> dict | None:
    """The identification string ``SSH-protoversion-softwareversion SP comments CRLF``.

    A server may send other lines before it (RFC 4253 §4.2), so the banner is looked for at the
    start of any captured line — either way: an agent's own server, or a client talking to a
    lenient one, may put lines first to step around a first-bytes check."""
    start = 0
    if not data.startswith(b"SSH-"):
        idx = data.find(b"\nSSH-")
        if idx < 0:
            return None
        start = idx + 1
    m = _SSH_ID.match(data, start)
    if m is None:
        return None
    line = data[start:m.end()].rstrip(b"\r\n")
    out = {
        "_protocol": SSH,
        "role": "client" if direction == EGRESS else "server",
        "banner": _text(line),
        "proto_version": _text(m.group("proto")),
        "software": _text(m.group("soft")),
    }
    if m.group("comments"):
        out["comments"] = _text(m.group("comments"))
    if m.group("end") is None:
        out["truncated"] = True
    if start:
        out["prebanner_bytes"] = start
    return out


# -- Stratum (Bitcoin-style mining.* and Monero-style login/getjob/submit JSON-RPC) -------------

STRATUM_METHODS = frozenset({
    "mining.subscribe", "mining.authorize", "mining.extranonce.subscribe", "mining.configure",
    "mining.submit", "mining.notify", "mining.set_difficulty", "mining.set_extranonce",
    "mining.suggest_difficulty", "mining.get_transactions", "mining.multi_version",
    "login", "getjob", "submit", "keepalived", "job",
})
_METHOD_RE = re.compile(rb'"method"\s*:\s*"([^"\\]{1,64})"')
_ID_RE = re.compile(rb'"id"\s*:\s*("?[^,}"]{0,32}"?)')
# Group 2 is the closing quote: absent when the capture cut the value.
_XMR_PARAM_RE = {k: re.compile(rb'"' + k.encode() + rb'"\s*:\s*"([^"\\]{0,200})(")?') for k in ("login", "agent", "pass", "rigid")}
# Replies a pool sends before any method name appears in the captured bytes.
_POOL_REPLY_MARKERS = (b'"mining.notify"', b'"mining.set_difficulty"', b'"job":{"blob"', b'"job": {"blob"',
                       b'"extensions":["algo"', b'"status":"KEEPALIVED"')


def _stratum_method_ok(method: str, raw: bytes) -> bool:
    if method.startswith("mining."):
        return True
    if method == "login":
        # A bare "login" is ordinary JSON-RPC; a miner's login carries wallet/pass/agent params.
        return any(p.search(raw) for k, p in _XMR_PARAM_RE.items() if k != "login") or \
            len(re.findall(rb'"login"', raw)) >= 2
    return method in STRATUM_METHODS and (b'"job_id"' in raw or b'"nonce"' in raw or b'"blob"' in raw)


def parse_stratum(data: bytes, direction: str = EGRESS) -> dict | None:
    """Line-delimited JSON-RPC as miners speak it. The miner's ``agent`` (its user agent:
    ``params.agent`` for xmrig-style ``login``, ``params[0]`` of ``mining.subscribe``) and the
    login/worker name are reported. Works on lines cut short by the capture."""
    head = data.lstrip()
    if not head.startswith(b"{"):
        return None
    lines = head.split(b"\n")
    methods: list[str] = []
    detail: dict = {"_protocol": STRATUM, "role": "client" if direction == EGRESS else "server"}
    for i, raw in enumerate(lines):
        raw = raw.strip()
        if not raw:
            continue
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = None
        if isinstance(msg, dict):
            method = msg.get("method")
            if isinstance(method, str):
                if _stratum_method_ok(method, raw):
                    methods.append(method)
                    _stratum_params(detail, method, msg.get("params"))
            elif "result" in msg and any(m in raw for m in _POOL_REPLY_MARKERS):
                detail.setdefault("reply", True)
            continue
        if i != len(lines) - 1:
            break  # a malformed line before the last: not line-delimited JSON-RPC
        # The last line, cut short by the capture: salvage what the bytes show.
        detail["truncated"] = True
        m = _METHOD_RE.search(raw)
        if m:
            method = _text(m.group(1))
            if _stratum_method_ok(method, raw):
                methods.append(method)
                for key in ("agent", "login", "rigid"):
                    pm = _XMR_PARAM_RE[key].search(raw)
                    if pm:
                        # A value cut by the capture is kept apart so it is never taken for the whole.
                        detail.setdefault(key if pm.group(2) else f"{key}_prefix", _text(pm.group(1)))
                if method == "mining.subscribe":
                    pm = re.search(rb'"params"\s*:\s*\[\s*"([^"\\]{1,200})', raw)
                    if pm:
                        detail.setdefault("agent", _text(pm.group(1)))
        elif any(mk in raw for mk in _POOL_REPLY_MARKERS):
            detail.setdefault("reply", True)
    if not methods and "reply" not in detail:
        return None
    if methods:
        detail["method"] = methods[0]
        detail["methods"] = methods
        idm = _ID_RE.search(head)
        if idm:
            detail.setdefault("id", _text(idm.group(1).strip(b'"')))
    return detail


def _stratum_params(detail: dict, method: str, params) -> None:
    if method == "login" and isinstance(params, dict):
        for key in ("agent", "login", "rigid"):
            v = params.get(key)
            if isinstance(v, str):
                detail.setdefault(key, v[:_MAX_STR])
        algo = params.get("algo")
        if isinstance(algo, list):
            detail.setdefault("algo", [a for a in algo if isinstance(a, str)][:16])
    elif method == "mining.subscribe" and isinstance(params, list) and params and isinstance(params[0], str):
        detail.setdefault("agent", params[0][:_MAX_STR])
    elif method == "mining.authorize" and isinstance(params, list) and params and isinstance(params[0], str):
        detail.setdefault("login", params[0][:_MAX_STR])


# -- TLS (RFC 8446 / 5246 record + handshake) --------------------------------------------------------

_TLS_VERSIONS = {0x0300: "SSL3.0", 0x0301: "TLS1.0", 0x0302: "TLS1.1", 0x0303: "TLS1.2", 0x0304: "TLS1.3"}
EXT_SNI, EXT_ALPN, EXT_SUPPORTED_VERSIONS = 0, 16, 43


class _Short(Exception):
    """The captured bytes end inside the structure being parsed."""


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else min(end, len(data))
        self.limit = end  # the declared end, which may lie past the captured bytes

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise _Short
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def sub(self, n: int) -> "_Reader":
        """A reader over the next n bytes, even when fewer were captured."""
        r = _Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return r

    def left(self) -> int:
        return self.end - self.pos


def _version_name(v: int) -> str:
    return _TLS_VERSIONS.get(v, f"0x{v:04x}")


def parse_tls(data: bytes, direction: str = EGRESS) -> dict | None:
    """A TLS handshake record: ClientHello (SNI, ALPN, offered versions) or ServerHello."""
    if len(data) < 3 or data[0] != 0x16 or data[1] != 0x03 or data[2] > 0x04:
        return None
    out: dict = {"_protocol": TLS, "role": "client" if direction == EGRESS else "server",
                 "record_version": _version_name(int.from_bytes(data[1:3], "big"))}
    r = _Reader(data, 3)
    try:
        rec_len = r.u16()
        rec = r.sub(rec_len)
        hs_type = rec.u8()
        out["handshake"] = {1: "client_hello", 2: "server_hello"}.get(hs_type, f"type_{hs_type}")
        if hs_type not in (1, 2):
            return out
        hs = rec.sub(rec.u24())
        out["legacy_version"] = _version_name(hs.u16())
        hs.take(32)  # random
        hs.take(hs.u8())  # session id
        if hs_type == 1:
            out["cipher_suites"] = hs.u16() // 2
            hs.take(out["cipher_suites"] * 2)
            hs.take(hs.u8())  # compression methods
        else:
            out["cipher_suite"] = f"0x{hs.u16():04x}"
            hs.u8()
        if hs.pos >= hs.limit:
            return out  # no extensions (SSL 3.0 style hello)
        exts = hs.sub(hs.u16())
        while exts.pos < exts.limit:
            etype = exts.u16()
            body = exts.sub(exts.u16())
            _tls_extension(out, etype, body, hs_type)
    except _Short:
        out["truncated"] = True
    if "version" not in out and "legacy_version" in out and not out.get("truncated"):
        # A complete hello without supported_versions negotiates its legacy version; a cut one
        # may still have offered TLS 1.3 in the part we did not see, so no version is claimed.
        out["version"] = out["legacy_version"]
    return out


def _tls_extension(out: dict, etype: int, body: _Reader, hs_type: int) -> None:
    try:
        if etype == EXT_SNI and hs_type == 1:
            names = body.sub(body.u16())
            while names.left() > 0:
                kind = names.u8()
                name = names.take(names.u16())
                if kind == 0:
                    out["sni"] = _text(name)
                    return
        elif etype == EXT_ALPN:
            protos = body.sub(body.u16())
            alpn = out.setdefault("alpn", [])
            while protos.left() > 0:
                alpn.append(_text(protos.take(protos.u8())))
        elif etype == EXT_SUPPORTED_VERSIONS:
            if hs_type == 1:
                vs = body.sub(body.u8())
                offered = []
                while vs.left() > 0:
                    v = vs.u16()
                    if (v & 0x0f0f) != 0x0a0a:  # skip GREASE values
                        offered.append(v)
                if offered:
                    out["version"] = _version_name(max(offered))
                    out["versions"] = [_version_name(v) for v in offered]
            else:
                out["version"] = _version_name(body.u16())
    except _Short:
        # An SNI cut off mid-name is not reported as a (wrong) shorter name.
        if etype == EXT_SNI:
            out["sni_truncated"] = True
        raise


# -- HTTP/1.x (RFC 9112 request and status lines) ---------------------------------------------------

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
                          "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT"})
_REQ_RE = re.compile(rb"(?P<method>[A-Z]{3,9}) (?P<target>[^ \r\n]{1,8192})(?: (?P<version>HTTP/\d(?:\.\d)?))?(?P<eol>\r?\n)?")
_STATUS_RE = re.compile(rb"(?P<version>HTTP/\d(?:\.\d)?) (?P<status>\d{3})(?: (?P<reason>[^\r\n]*))?(?:\r?\n)?")
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def parse_http(data: bytes, direction: str = EGRESS) -> dict | None:
    """Request line, Host and User-Agent; CONNECT requests are flagged as tunnels. On ingress,
    the status line. The HTTP/2 connection preface counts as HTTP (version 2)."""
    role = "client" if direction == EGRESS else "server"
    if data.startswith(_H2_PREFACE[:min(len(data), len(_H2_PREFACE))]) and len(data) >= 8:
        return {"_protocol": HTTP, "role": role, "version": "HTTP/2", "preface": True}
    m = _STATUS_RE.match(data)
    if m:
        out = {"_protocol": HTTP, "role": role, "version": _text(m.group("version")),
               "status": int(m.group("status"))}
        if m.group("reason"):
            out["reason"] = _text(m.group("reason"))
        _http_headers(out, data[m.end():])
        return out
    m = _REQ_RE.match(data)
    if not m or m.group("method").decode() not in HTTP_METHODS:
        return None
    if m.group("version") is None and m.group("eol") is None and m.end() < len(data):
        return None  # "GET x" followed by something that is not HTTP
    method = m.group("method").decode()
    target = m.group("target")
    out = {"_protocol": HTTP, "role": role, "method": method, "path": _text(target, 2048)}
    if m.group("version"):
        out["version"] = _text(m.group("version"))
    else:
        out["truncated"] = True
    if method == "CONNECT":
        out["tunnel"] = True
        host, sep, port = target.rpartition(b":")
        if sep and port.isdigit():
            out["connect_host"] = _text(host.strip(b"[]"))
            out["connect_port"] = int(port)
    _http_headers(out, data[m.end():])
    return out


def _http_headers(out: dict, rest: bytes) -> None:
    lines = rest.split(b"\n")
    complete = rest.endswith(b"\n")
    for i, line in enumerate(lines):
        line = line.rstrip(b"\r")
        if not line:
            if i < len(lines) - 1:
                return  # end of the header block
            continue
        last = i == len(lines) - 1 and not complete
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower()
        field = {b"host": "host", b"user-agent": "user_agent", b"upgrade": "upgrade", b"server": "server"}.get(key)
        if field and field not in out:
            out[field] = _text(value.strip())
            if last:
                out["truncated"] = True
    if not complete:
        out.setdefault("truncated", True)


# -- kernel flow records → record parts ---------------------------------------------------------

def flow_parts(rec) -> tuple[dict, dict]:
    """The ``net`` and ``flow`` parts of a the record contract (tracer/schema/event.schema.json) ``flow`` record from one kernel
    ``struct at_flow`` (agenttrace.kernel.wire.Flow). ``net.src`` is always the agent's end and
    ``net.dst`` the remote end, whichever way the bytes went (``flow.direction``); scope and
    name are left for the enrich stage. ``flow.protocol`` is the userspace classification;
    where that finds nothing but the kernel's quick check did (the kernel acts on it), the
    kernel's is reported, and ``kernel_hint`` always says what the kernel saw."""
    from agenttrace.kernel.wire import FLOWF_NAMES, addr_str

    egress = rec.direction == 0
    fam = "ipv6" if rec.family == 10 else "ipv4"
    src = {"addr": addr_str(rec.saddr, rec.family), "port": int(rec.sport)}
    dst = {"addr": addr_str(rec.daddr, rec.family), "port": int(rec.dport)}
    local, remote = (src, dst) if egress else (dst, src)
    data = bytes(rec.data)[:min(int(rec.len), len(rec.data))]
    protocol, detail = classify(data, EGRESS if egress else INGRESS)
    hint = PROTO_HINT_NAMES.get(int(rec.proto_hint), UNKNOWN)
    if protocol == UNKNOWN and hint != UNKNOWN:
        protocol = hint
    net = {"proto": "tcp", "family": fam, "src": local, "dst": dict(remote),
           "verdict": "blocked" if rec.verdict == 1 else "allowed"}
    flow = {"protocol": protocol, "detail": detail, "direction": EGRESS if egress else INGRESS,
            "bytes": len(data), "kernel_hint": hint}
    # How the kernel took the capture (probes/flow.c reassembly): leading whitespace skipped,
    # segments it came from, and the AT_FLOWF_* flags by name.
    flow["padding"] = int(getattr(rec, "skipped", 0))
    flow["segments"] = int(getattr(rec, "segs", 0))
    ff = int(getattr(rec, "fflags", 0))
    flow["capture"] = [name for bit, name in sorted(FLOWF_NAMES.items()) if ff & bit]
    return net, flow


# -- the kernel's protocol policy map (probes/flow.c `flow_policy`) ------------------------------

FLOW_SLOTS = 4  # AT_FLOW_SLOTS in probes/flow.c


class FlowPolicyError(ValueError):
    pass


def write_flow_policy(table, drops) -> None:
    """Write compiled ``ProtocolDrop`` entries (agenttrace.match.policy) into the BCC table
    ``flow_policy``: new entries first, stale ones deleted after, so a reload never opens a
    window in which a forbidden protocol passes. More than FLOW_SLOTS entries for one
    (group, protocol) cannot be held and raise FlowPolicyError instead of being dropped."""
    want: dict[tuple[int, int], list] = {}
    for d in drops:
        if d.protocol not in (PROTO_HINT_IDS[SSH], PROTO_HINT_IDS[STRATUM]):
            raise FlowPolicyError(f"policy {d.policy_id}: the kernel recognises only ssh and stratum, "
                                  f"not protocol {d.protocol}")
        slots = want.setdefault((d.group_id, d.protocol), [])
        if len(slots) >= FLOW_SLOTS:
            raise FlowPolicyError(f"more than {FLOW_SLOTS} protocol drops for group {d.group_id} and "
                                  f"{PROTO_HINT_NAMES[d.protocol]}; merge their port ranges")
        slots.append(d)
    keep = set()
    for (gid, proto), slots in want.items():
        leaf = table.Leaf()
        for i, d in enumerate(slots):
            s = leaf.s[i]
            s.policy_id, s.port_lo, s.port_hi, s.scope_mask = d.policy_id, d.port_lo, d.port_hi, d.scope_mask
        key = table.Key(gid, proto)
        table[key] = leaf
        keep.add((gid, proto))
    for k in list(table.keys()):
        if (k.gid, k.proto) not in keep:
            try:
                del table[k]
            except KeyError:
                pass
