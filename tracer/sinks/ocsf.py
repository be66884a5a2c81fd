"""the record contract (tracer/schema/event.schema.json) records rendered as OCSF 1.4.0 events for SIEMs that ingest OCSF.

Classes: exec/exit → Process Activity (1007); file → File System Activity (1001);
connect/listen/flow → Network Activity (4001); dns → DNS Activity (4003); alert → Detection
Finding (2004); lifecycle → Application Lifecycle (6002); fork/gpu/device, which no OCSF class
describes, → Base Event (0) with the body under `unmapped`. Every event carries the base
mandatory fields, `metadata.product`/`version`/`profiles`, and the original agent identity
under `unmapped.agent`. `tests/test_ocsf_schema.py` validates every kind against the official
1.4.0 schema vendored in `tests/data/ocsf/`.

1.4.0 rather than 1.3.0: `is_alert` and action 3 (Observed) on findings are 1.4.0 attributes.
Profiles: `host` for `actor`/`device`, `security_control` for action/disposition; an event
lists in `metadata.profiles` exactly those whose attributes it carries.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import time
import uuid
from typing import Any, Dict, Optional

import orjson

from agenttrace import __version__
from agenttrace.timefmt import parse_ns

OCSF_VERSION = "1.4.0"
PRODUCT = {"name": "agenttrace", "vendor_name": "agenttrace", "version": __version__}

_SEVERITY = {"info": (1, "Informational"), "low": (2, "Low"), "medium": (3, "Medium"),
             "high": (4, "High"), "critical": (5, "Critical")}

_CATEGORY = {0: "Uncategorized", 1: "System Activity", 2: "Findings", 4: "Network Activity",
             6: "Application Activity"}
_CLASS = {0: ("Base Event", 0), 1001: ("File System Activity", 1), 1007: ("Process Activity", 1),
          2004: ("Detection Finding", 2), 4001: ("Network Activity", 4), 4003: ("DNS Activity", 4),
          6002: ("Application Lifecycle", 6)}

# Network Activity activity_id by the §5 connect result.
_CONNECT_ACTIVITY = {"established": (1, "Open"), "pending": (1, "Open"), "refused": (5, "Refuse"),
                     "blocked": (5, "Refuse"), "error": (4, "Fail"), "sent": (6, "Traffic")}
_LIFECYCLE_ACTIVITY = {"started": (3, "Start"), "stopped": (4, "Stop"), "reloaded": (8, "Update")}
# Detection Finding: what happened, as OCSF action (1 Allowed, 2 Denied, 3 Observed) and
# disposition (2 Blocked, 4 Isolated, 7 Custom Action, 15 Detected, 16 No Action).
# `exited`: the target was gone before the action ran, so nothing was done to it.
_OUTCOME = {"reported": (3, "Observed", 15, "Detected"), "blocked": (2, "Denied", 2, "Blocked"),
            "killed": (2, "Denied", 7, "Custom Action"), "frozen": (2, "Denied", 4, "Isolated"),
            "exited": (3, "Observed", 16, "No Action")}
_PROTO_NUM = {"tcp": 6, "udp": 17}
# connection_info.boundary_id from dst.scope; the metadata service has no OCSF boundary.
_BOUNDARY = {"loopback": (1, "Localhost"), "internal": (2, "Internal"), "external": (3, "External"),
             "metadata": (99, "Cloud metadata")}
_RCODE = {"NOERROR": (0, "NoError"), "FORMERR": (1, "FormError"), "SERVFAIL": (2, "ServError"),
          "NXDOMAIN": (3, "NXDomain"), "NOTIMP": (4, "NotImp"), "REFUSED": (5, "Refused"),
          "YXDOMAIN": (6, "YXDomain"), "YXRRSET": (7, "YXRRSet"), "NXRRSET": (8, "NXRRSet"),
          "NOTAUTH": (9, "NotAuth"), "NOTZONE": (10, "NotZone"), "DSOTYPENI": (11, "DSOTYPENI"),
          "BADVERS": (16, "BADSIG_VERS"), "BADSIG": (16, "BADSIG_VERS"), "BADKEY": (17, "BADKEY"),
          "BADTIME": (18, "BADTIME"), "BADMODE": (19, "BADMODE"), "BADNAME": (20, "BADNAME"),
          "BADALG": (21, "BADALG"), "BADTRUNC": (22, "BADTRUNC"), "BADCOOKIE": (23, "BADCOOKIE")}
# hostname_t: RFC 1123 labels. DNS names such as `_dmarc.example` are valid queries but not
# host names; those stay in `unmapped` only.
_HOST_RE = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_UID_NS = uuid.UUID("6c1f3a4e-8d2b-5f7a-9e0c-41a7d3b2c9e5")
_NODE = socket.gethostname() or "localhost"


def _hostname(name: Any) -> Optional[str]:
    return name if isinstance(name, str) and _HOST_RE.match(name) else None


def _ms(ts: Any) -> int:
    # `time` is mandatory; a record with a broken ts still gets one (when we render it).
    try:
        return parse_ns(ts) // 1_000_000
    except (TypeError, ValueError, AttributeError):
        return time.time_ns() // 1_000_000


def _base(record: dict, class_uid: int, activity_id: int, activity_name: str,
          severity: str = "info") -> Dict[str, Any]:
    class_name, category_uid = _CLASS[class_uid]
    sev_id, sev_name = _SEVERITY.get(severity, (0, "Unknown"))
    ts = record.get("ts")
    ev: Dict[str, Any] = {
        "category_uid": category_uid,
        "category_name": _CATEGORY[category_uid],
        "class_uid": class_uid,
        "class_name": class_name,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        # type_name names the activity id's caption; a data-source name (activity 99) stays in
        # activity_name only.
        "type_name": f"{class_name}: {'Other' if activity_id == 99 else activity_name}",
        "severity_id": sev_id,
        "severity": sev_name,
        "time": _ms(ts),
        "metadata": {"product": dict(PRODUCT), "version": OCSF_VERSION, "log_name": record.get("kind"),
                     "profiles": []},
    }
    if isinstance(ts, str):
        ev["metadata"]["original_time"] = ts
    if record.get("schema_version") is not None:
        ev["metadata"]["log_version"] = str(record["schema_version"])
    unmapped: Dict[str, Any] = {}
    if record.get("agent"):
        unmapped["agent"] = record["agent"]
    if unmapped:
        ev["unmapped"] = unmapped
    return ev


def _device(ev: dict, record: dict) -> None:
    """The node as `device` (host profile). A record without `node` was made on this host."""
    node = record.get("node") or _NODE
    dev: Dict[str, Any] = {"type_id": 1, "type": "Server", "name": str(node)}
    if _hostname(node):
        dev["hostname"] = node
    ev["device"] = dev
    _profile(ev, "host")


def _profile(ev: dict, name: str) -> None:
    profiles = ev["metadata"]["profiles"]
    if name not in profiles:
        profiles.append(name)


def _set_actor(ev: dict, actor: Dict[str, Any]) -> None:
    if actor:
        ev["actor"] = actor
        _profile(ev, "host")


def _set_action(ev: dict, action: tuple, disposition: tuple) -> None:
    ev["action_id"], ev["action"] = action
    ev["disposition_id"], ev["disposition"] = disposition
    _profile(ev, "security_control")


def _unmapped(ev: dict, key: str, value: Any) -> None:
    if value is not None:
        ev.setdefault("unmapped", {})[key] = value


def _process(proc: Optional[dict]) -> Dict[str, Any]:
    if not proc:
        return {}
    p: Dict[str, Any] = {}
    if proc.get("pid") is not None:
        p["pid"] = proc["pid"]
    if proc.get("exec_id"):
        p["uid"] = str(proc["exec_id"])
    if proc.get("comm"):
        p["name"] = proc["comm"]
    exe = proc.get("exe")
    if exe:
        p["file"] = _file_obj(exe, regular=True)
    args = proc.get("args")
    if args:
        p["cmd_line"] = shlex.join(str(a) for a in args)
    if proc.get("uid") is not None:
        p["user"] = {"uid": str(proc["uid"])}
    parent = _parent(proc)
    if parent:
        p["parent_process"] = parent
    ancestry = proc.get("ancestry") or []
    if ancestry:
        p["lineage"] = [a.get("exe") or a.get("comm") or "" for a in ancestry]
    return p


def _parent(proc: dict) -> Dict[str, Any]:
    """The parent by `ppid` (who reaps it now). `ancestry` is the creator chain: its first entry
    describes the parent only while the creator still is the parent (not after a reparent)."""
    ppid = proc.get("ppid")
    ancestry = proc.get("ancestry") or []
    if ppid is None:
        return {}
    first = ancestry[0] if ancestry else None
    if first and first.get("pid") == ppid:
        out = _ancestor(first)
    else:
        out = {"pid": ppid}
    if proc.get("parent_exec_id"):
        out["uid"] = str(proc["parent_exec_id"])
    return out


def _ancestor(a: dict) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if a.get("pid") is not None:
        out["pid"] = a["pid"]
    if a.get("comm"):
        out["name"] = a["comm"]
    if a.get("exe"):
        out["file"] = _file_obj(a["exe"], regular=True)
    return out


def _file_obj(path: str, regular: bool = False) -> Dict[str, Any]:
    name = path.rsplit("/", 1)[-1] or path
    t = (1, "Regular File") if regular else (0, "Unknown")
    return {"name": name, "path": path, "type_id": t[0], "type": t[1]}


def _endpoint(e: Optional[dict]) -> Dict[str, Any]:
    """An OCSF endpoint, or {} when nothing identifies it (an empty one fails the schema)."""
    if not e:
        return {}
    out: Dict[str, Any] = {}
    if e.get("addr"):
        out["ip"] = e["addr"]
    host = _hostname(e.get("name"))
    if host:
        out["hostname"] = host
    if out and e.get("port") is not None:
        out["port"] = e["port"]
    return out


def _connection_info(net: dict, direction_id: int, scope: Any = None) -> Dict[str, Any]:
    ci: Dict[str, Any] = {"direction_id": direction_id,
                          "direction": {1: "Inbound", 2: "Outbound"}.get(direction_id, "Unknown")}
    proto = net.get("proto")
    if proto:
        ci["protocol_name"] = proto
        if proto in _PROTO_NUM:
            ci["protocol_num"] = _PROTO_NUM[proto]
    fam = net.get("family")
    if fam in ("ipv4", "ipv6"):
        ci["protocol_ver_id"] = 4 if fam == "ipv4" else 6
        ci["protocol_ver"] = "Internet Protocol version 4 (IPv4)" if fam == "ipv4" else \
            "Internet Protocol version 6 (IPv6)"
    if scope in _BOUNDARY:
        ci["boundary_id"], ci["boundary"] = _BOUNDARY[scope]
    return ci


def _actor(proc: Optional[dict]) -> Dict[str, Any]:
    p = _process(proc)
    return {"process": p} if p else {}


def _process_activity(record: dict) -> dict:
    proc = record.get("proc") or {}
    if record["kind"] == "exec":
        ev = _base(record, 1007, 1, "Launch")
        parent = _parent(proc)
        # The actor of a launch is the parent that made it.
        _set_actor(ev, {"process": parent} if parent else {"app_name": "agenttrace"})
        if proc.get("killed_in_kernel"):
            # The kernel policy killed it before the new image ran: a launch that was denied.
            _set_action(ev, (2, "Denied"), (2, "Blocked"))
    else:
        ev = _base(record, 1007, 2, "Terminate")
        _set_actor(ev, _actor(proc) or {"app_name": "agenttrace"})
        if record.get("exit_code") is not None:
            ev["exit_code"] = record["exit_code"]
        _unmapped(ev, "duration_ms", record.get("duration_ms"))
        _unmapped(ev, "signal", record.get("signal"))
    ev["process"] = _process(proc) or {"pid": 0}
    _device(ev, record)
    return ev


def _network(record: dict) -> dict:
    kind = record["kind"]
    net = record.get("net") or {}
    scope = (net.get("dst") or {}).get("scope")
    if kind == "connect":
        aid, aname = _CONNECT_ACTIVITY.get(str(net.get("result")), (99, str(net.get("result") or "Other")))
        ev = _base(record, 4001, aid, aname)
        src, dst = _endpoint(net.get("src")), _endpoint(net.get("dst"))
        ev["connection_info"] = _connection_info(net, 2, scope)
        blocked = net.get("verdict") == "blocked"
        _set_action(ev, (2, "Denied") if blocked else (1, "Allowed"), (2, "Blocked") if blocked else (1, "Allowed"))
        _unmapped(ev, "scope", scope)
        _unmapped(ev, "result", net.get("result"))
    elif kind == "listen":
        accept = net.get("what") == "accept"
        ev = _base(record, 4001, 1 if accept else 7, "Open" if accept else "Listen")
        # The listener is the responder side; an accepted peer is the initiator.
        dst, src = _endpoint(net.get("local")), _endpoint(net.get("remote"))
        scope = (net.get("remote") or {}).get("scope")
        ev["connection_info"] = _connection_info(net, 1, scope)
    else:  # flow
        ev = _base(record, 4001, 6, "Traffic")
        src, dst = _endpoint(net.get("src")), _endpoint(net.get("dst"))
        ev["connection_info"] = _connection_info(net, 2, scope)
        flow = record.get("flow") or {}
        if flow.get("protocol"):
            ev["app_name"] = flow["protocol"]
        detail = flow.get("detail")
        if flow.get("protocol") == "tls" and isinstance(detail, dict) and detail.get("version"):
            # tls.version is required; a hello whose version we could not tell keeps its SNI
            # under unmapped.flow only.
            tls = {"version": str(detail["version"])}
            if _hostname(detail.get("sni")):
                tls["sni"] = detail["sni"]
            ev["tls"] = tls
        _unmapped(ev, "flow", flow or None)
        if net.get("verdict") == "blocked":
            _set_action(ev, (2, "Denied"), (2, "Blocked"))
    if src:
        ev["src_endpoint"] = src
    if dst:
        ev["dst_endpoint"] = dst
    _unmapped(ev, "net", net or None)
    _set_actor(ev, _actor(record.get("proc")))
    _device(ev, record)
    return ev


def _dns(record: dict) -> dict:
    d = record.get("dns") or {}
    net = record.get("net") or {}
    answers = d.get("answers")
    response = bool(d.get("response")) or d.get("direction") == "ingress" or bool(answers) or "rcode" in d
    ev = _base(record, 4003, 2 if response else 1, "Response" if response else "Query")
    host = _hostname((d.get("query") or "").rstrip(".") or None)
    if host:
        q: Dict[str, Any] = {"hostname": host, "class": "IN"}
        if d.get("qtype"):
            q["type"] = str(d["qtype"])
        if d.get("id") is not None:
            q["packet_uid"] = d["id"]
        ev["query"] = q
    # The client asks, the server answers, whichever way this message went.
    src = _endpoint(net.get("src")) if net.get("src") else {}
    dst = _endpoint(d.get("server") or net.get("dst"))
    if src:
        ev["src_endpoint"] = src
    if dst:
        ev["dst_endpoint"] = dst
    if not src and not dst:
        ev["dst_endpoint"] = {"name": "unknown DNS server"}
    if response and d.get("rcode"):
        rc = str(d["rcode"]).upper()
        ev["rcode_id"], ev["rcode"] = _RCODE.get(rc, (99, rc))
    if answers:
        out = []
        for a in answers:
            if not isinstance(a, dict):
                out.append({"rdata": str(a)})
                continue
            data = a.get("data", a.get("addr"))
            if data is None:
                continue
            ans: Dict[str, Any] = {"rdata": str(data)}
            if a.get("type"):
                ans["type"] = str(a["type"])
            if a.get("ttl") is not None:
                ans["ttl"] = a["ttl"]
            out.append(ans)
        if out:
            ev["answers"] = out
    _unmapped(ev, "dns", d or None)
    _set_actor(ev, _actor(record.get("proc")))
    _device(ev, record)
    return ev


def _finding_uid(record: dict) -> str:
    """Stable for one alert record (a re-render gives the same uid) and distinct between any
    two alert records that differ in any field, ts included."""
    return str(uuid.uuid5(_UID_NS, orjson.dumps(record, option=orjson.OPT_SORT_KEYS,
                                                  default=str).decode()))


def _finding(record: dict) -> dict:
    rule = record.get("rule") or {}
    sev = str(rule.get("severity") or "info")
    ev = _base(record, 2004, 1, "Create", sev)
    rid = str(rule.get("id") or "unknown")
    uid = _finding_uid(record)
    ev["metadata"]["uid"] = uid
    info: Dict[str, Any] = {
        "uid": uid,
        "title": rule.get("message") or rid,
        "analytic": {"uid": rid, "name": rid, "type_id": 1, "type": "Rule"},
        "types": [rule["category"]] if rule.get("category") else [],
        "product_uid": "agenttrace",
    }
    if rule.get("message"):
        info["desc"] = rule["message"]
    attacks = [{"technique": {"uid": t}} for t in rule.get("tags") or []
               if isinstance(t, str) and t.startswith("T") and t[1:2].isdigit()]
    if attacks:
        info["attacks"] = attacks
    ev["finding_info"] = info
    outcome = str(rule.get("outcome") or "reported")
    a_id, a_name, d_id, d_name = _OUTCOME.get(outcome, (0, "Unknown", 0, "Unknown"))
    _set_action(ev, (a_id, a_name), (d_id, d_name))
    ev.update(is_alert=True, status_id=1, status="New")
    evidence: Dict[str, Any] = {}
    if record.get("proc"):
        evidence["process"] = _process(record["proc"])
        _set_actor(ev, {"process": evidence["process"]})
    net = record.get("net")
    if net:
        for key, src_key in (("dst_endpoint", "dst"), ("src_endpoint", "src"), ("dst_endpoint", "local")):
            e = _endpoint(net.get(src_key))
            if e:
                evidence[key] = e
        evidence["connection_info"] = _connection_info(net, 2, (net.get("dst") or {}).get("scope"))
    host = _hostname((record.get("dns") or {}).get("query"))
    if host:
        evidence["query"] = {"hostname": host, "class": "IN"}
    if record.get("file"):
        fp = record["file"].get("path") or record["file"].get("raw_path") or ""
        if fp:
            evidence["file"] = _file_obj(fp)
    if evidence:
        ev["evidences"] = [evidence]
    _device(ev, record)
    _unmapped(ev, "rule", {k: rule[k] for k in ("action", "outcome", "tags", "category") if k in rule})
    for k in ("trigger", "net", "flow", "dns", "gpu", "device", "file"):
        _unmapped(ev, k, record.get(k))
    return ev


def _file_activity(record: dict) -> dict:
    f = record.get("file") or {}
    sc = f.get("syscall") or ""
    if sc.startswith("rename"):
        aid, aname = 5, "Rename"
    elif sc.startswith("link"):
        aid, aname = 1, "Create"      # a new name for an existing file; OCSF has no "link"
    else:
        aid, aname = 14, "Open"
    ev = _base(record, 1001, aid, aname)
    _set_actor(ev, _actor(record.get("proc")) or {"app_name": "agenttrace"})
    path = f.get("path") or f.get("raw_path") or ""
    ev["file"] = _file_obj(path) if path else {"name": "(unreadable)", "type_id": 0, "type": "Unknown"}
    killed = f.get("verdict") == "killed"
    _set_action(ev, (2, "Denied") if killed else (1, "Allowed"), (7, "Custom Action") if killed else (1, "Allowed"))
    _device(ev, record)
    _unmapped(ev, "file", f)
    return ev


def _lifecycle(record: dict) -> dict:
    phase = str(record.get("phase") or "")
    aid, aname = _LIFECYCLE_ACTIVITY.get(phase, (99, phase or "Other"))
    ev = _base(record, 6002, aid, aname)
    ev["app"] = dict(PRODUCT)
    for k, v in record.items():
        if k not in ("ts", "kind", "node", "agent", "phase"):
            _unmapped(ev, k, v)
    _unmapped(ev, "phase", phase)
    _unmapped(ev, "node", record.get("node"))
    return ev


def _other(record: dict) -> dict:
    # Base Event has no device or actor in 1.4.0 without profiles; the node goes to unmapped.
    kind = str(record.get("kind") or "")
    ev = _base(record, 0, 99, kind or "Other")
    for k, v in record.items():
        if k not in ("ts", "kind", "agent"):
            _unmapped(ev, k, v)
    return ev


_BY_KIND = {"exec": _process_activity, "exit": _process_activity, "connect": _network,
            "listen": _network, "flow": _network, "dns": _dns, "alert": _finding, "file": _file_activity,
            "lifecycle": _lifecycle}


def to_ocsf(record: dict) -> dict:
    """One §5 record as one OCSF event (a new dict; the record is not changed)."""
    return _BY_KIND.get(record.get("kind"), _other)(record)


def _summary(record: dict) -> dict:
    """An agent's `summary`: no OCSF class describes a session's totals, so a Base Event whose
    own attributes carry the span and the record count, the body under `unmapped.summary`."""
    ev = _other(record)
    s = record.get("summary") or {}
    agent = record.get("agent") or {}
    ev["message"] = (f"agent {agent.get('id')}: {s.get('records', 0)} records, {s.get('alerts', 0)} alerts "
                     f"({s.get('reason')})")
    ev["count"] = s.get("records", 0)
    if s.get("first_ts") and s.get("last_ts"):
        ev["start_time"], ev["end_time"] = _ms(s["first_ts"]), _ms(s["last_ts"])
        ev["duration"] = ev["end_time"] - ev["start_time"]
    return ev


_BY_KIND["summary"] = _summary
