"""DESIGN §5 records rendered as OCSF 1.x events for SIEMs that ingest OCSF.

Classes: exec/exit → Process Activity (1007); file → File System Activity (1001);
connect/listen/flow → Network Activity (4001);
dns → DNS Activity (4003); alert → Detection Finding (2004); lifecycle → Application
Lifecycle (6002); gpu/device, which no OCSF 1.x class describes, → Base Event (0) with the
body under `unmapped`. Every event carries the base mandatory fields (category_uid,
class_uid, activity_id, type_uid = class_uid*100 + activity_id, severity_id, time in ms,
metadata.product, metadata.version) and the original agent identity under `unmapped.agent`.
"""
from __future__ import annotations

import os
import shlex
import time
from typing import Any, Dict, Optional

from . import __version__
from .timefmt import parse_ns

OCSF_VERSION = "1.3.0"
PRODUCT = {"name": "agenttrace", "vendor_name": "agenttrace", "version": __version__}

_SEVERITY = {"info": (1, "Informational"), "low": (2, "Low"), "medium": (3, "Medium"),
             "high": (4, "High"), "critical": (5, "Critical")}

_CATEGORY = {0: "Uncategorized", 1: "System Activity", 2: "Findings", 4: "Network Activity",
             6: "Application Activity"}
_CLASS = {0: ("Base Event", 0), 1001: ("File System Activity", 1), 1007: ("Process Activity", 1), 2004: ("Detection Finding", 2),
          4001: ("Network Activity", 4), 4003: ("DNS Activity", 4), 6002: ("Application Lifecycle", 6)}

# Network Activity activity_id by the §5 connect result.
_CONNECT_ACTIVITY = {"established": (1, "Open"), "pending": (1, "Open"), "refused": (5, "Refuse"),
                     "blocked": (5, "Refuse"), "error": (4, "Fail"), "sent": (6, "Traffic")}
_LIFECYCLE_ACTIVITY = {"started": (3, "Start"), "stopped": (4, "Stop"), "reloaded": (8, "Update")}
# Detection Finding: what happened, as OCSF action (1 Allowed, 2 Denied, 3 Observed) and
# disposition (2 Blocked, 7 Custom Action, 15 Detected).
_OUTCOME = {"reported": (3, "Observed", 15, "Detected"), "blocked": (2, "Denied", 2, "Blocked"),
            "killed": (2, "Denied", 7, "Custom Action")}
_PROTO_NUM = {"tcp": 6, "udp": 17}


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
        "type_name": f"{class_name}: {activity_name}",
        "severity_id": sev_id,
        "severity": sev_name,
        "time": _ms(ts),
        "metadata": {"product": dict(PRODUCT), "version": OCSF_VERSION, "log_name": record.get("kind")},
    }
    if isinstance(ts, str):
        ev["metadata"]["original_time"] = ts
    if record.get("node"):
        ev["device"] = {"hostname": record["node"], "type_id": 1, "type": "Server"}
    unmapped: Dict[str, Any] = {}
    if record.get("agent"):
        unmapped["agent"] = record["agent"]
    if unmapped:
        ev["unmapped"] = unmapped
    return ev


def _unmapped(ev: dict, key: str, value: Any) -> None:
    if value is not None:
        ev.setdefault("unmapped", {})[key] = value


def _process(proc: Optional[dict]) -> Dict[str, Any]:
    if not proc:
        return {}
    p: Dict[str, Any] = {}
    if proc.get("pid") is not None:
        p["pid"] = proc["pid"]
    if proc.get("comm"):
        p["name"] = proc["comm"]
    exe = proc.get("exe")
    if exe:
        p["file"] = {"path": exe, "name": os.path.basename(exe), "type_id": 1, "type": "Regular File"}
    args = proc.get("args")
    if args:
        p["cmd_line"] = shlex.join(str(a) for a in args)
    if proc.get("uid") is not None:
        p["user"] = {"uid": str(proc["uid"])}
    ancestry = proc.get("ancestry") or []
    parent = _ancestor(ancestry[0]) if ancestry else {}
    if proc.get("ppid") is not None:
        parent.setdefault("pid", proc["ppid"])
    if parent:
        p["parent_process"] = parent
    if ancestry:
        p["lineage"] = [a.get("exe") or a.get("comm") or "" for a in ancestry]
    return p


def _ancestor(a: dict) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if a.get("pid") is not None:
        out["pid"] = a["pid"]
    if a.get("comm"):
        out["name"] = a["comm"]
    if a.get("exe"):
        out["file"] = {"path": a["exe"], "name": os.path.basename(a["exe"]), "type_id": 1,
                       "type": "Regular File"}
    return out


def _endpoint(e: Optional[dict]) -> Dict[str, Any]:
    if not e:
        return {}
    out: Dict[str, Any] = {}
    if e.get("addr"):
        out["ip"] = e["addr"]
    if e.get("port") is not None:
        out["port"] = e["port"]
    if e.get("name"):
        out["hostname"] = e["name"]
    return out


def _connection_info(net: dict, direction_id: int) -> Dict[str, Any]:
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
    return ci


def _actor(proc: Optional[dict]) -> Dict[str, Any]:
    p = _process(proc)
    return {"process": p} if p else {}


def _process_activity(record: dict) -> dict:
    proc = record.get("proc") or {}
    if record["kind"] == "exec":
        ev = _base(record, 1007, 1, "Launch")
        parent = _process(proc).get("parent_process")
        # The actor of a launch is the parent that made it.
        ev["actor"] = {"process": parent} if parent else {}
    else:
        ev = _base(record, 1007, 2, "Terminate")
        ev["actor"] = _actor(proc)
        if record.get("exit_code") is not None:
            ev["exit_code"] = record["exit_code"]
        _unmapped(ev, "duration_ms", record.get("duration_ms"))
    ev["process"] = _process(proc)
    ev.setdefault("device", {"type_id": 0, "type": "Unknown"})
    return ev


def _network(record: dict) -> dict:
    kind = record["kind"]
    net = record.get("net") or {}
    if kind == "connect":
        aid, aname = _CONNECT_ACTIVITY.get(str(net.get("result")), (99, "Other"))
        ev = _base(record, 4001, aid, aname)
        ev["src_endpoint"] = _endpoint(net.get("src"))
        ev["dst_endpoint"] = _endpoint(net.get("dst"))
        ev["connection_info"] = _connection_info(net, 2)
        blocked = net.get("verdict") == "blocked"
        ev["action_id"], ev["action"] = (2, "Denied") if blocked else (1, "Allowed")
        ev["disposition_id"], ev["disposition"] = (2, "Blocked") if blocked else (1, "Allowed")
        _unmapped(ev, "scope", (net.get("dst") or {}).get("scope"))
        _unmapped(ev, "result", net.get("result"))
    elif kind == "listen":
        ev = _base(record, 4001, 7, "Listen")
        # The listener is the responder side of future connections.
        ev["dst_endpoint"] = _endpoint(net.get("local"))
        ev["connection_info"] = _connection_info(net, 1)
    else:  # flow
        ev = _base(record, 4001, 6, "Traffic")
        ev["src_endpoint"] = _endpoint(net.get("src"))
        ev["dst_endpoint"] = _endpoint(net.get("dst"))
        ev["connection_info"] = _connection_info(net, 2)
        flow = record.get("flow") or {}
        if flow.get("protocol"):
            ev["app_name"] = flow["protocol"]
        detail = flow.get("detail")
        if flow.get("protocol") == "tls" and isinstance(detail, dict) and detail.get("sni"):
            ev["tls"] = {"sni": detail["sni"]}
        _unmapped(ev, "flow", flow or None)
        if net.get("verdict") == "blocked":
            ev["action_id"], ev["action"] = 2, "Denied"
            ev["disposition_id"], ev["disposition"] = 2, "Blocked"
    if not ev.get("src_endpoint") and not ev.get("dst_endpoint"):
        ev["dst_endpoint"] = {}  # OCSF requires at least one endpoint object
    ev["actor"] = _actor(record.get("proc"))
    return ev


def _dns(record: dict) -> dict:
    d = record.get("dns") or {}
    answers = d.get("answers")
    ev = _base(record, 4003, 6 if answers else 1, "Traffic" if answers else "Query")
    q: Dict[str, Any] = {"hostname": d.get("query") or ""}
    if d.get("qtype"):
        q["type"] = str(d["qtype"])
    q["class"] = "IN"
    ev["query"] = q
    ev["dst_endpoint"] = _endpoint(d.get("server"))
    if answers:
        ev["answers"] = [{"rdata": a} if not isinstance(a, dict) else
                         {k: v for k, v in (("rdata", a.get("data", a.get("addr"))), ("type", a.get("type")),
                                            ("ttl", a.get("ttl"))) if v is not None}
                         for a in answers]
    ev["actor"] = _actor(record.get("proc"))
    return ev


def _finding(record: dict) -> dict:
    rule = record.get("rule") or {}
    sev = str(rule.get("severity") or "info")
    ev = _base(record, 2004, 1, "Create", sev)
    rid = str(rule.get("id") or "unknown")
    agent = (record.get("agent") or {}).get("id", "")
    info: Dict[str, Any] = {
        "uid": f"{rid}:{agent}:{record.get('ts', '')}",
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
    ev.update(action_id=a_id, action=a_name, disposition_id=d_id, disposition=d_name,
              is_alert=True, status_id=1, status="New")
    evidence: Dict[str, Any] = {}
    if record.get("proc"):
        evidence["process"] = _process(record["proc"])
        ev["actor"] = {"process": evidence["process"]}
    net = record.get("net")
    if net:
        if net.get("dst"):
            evidence["dst_endpoint"] = _endpoint(net["dst"])
        if net.get("src"):
            evidence["src_endpoint"] = _endpoint(net["src"])
        if net.get("local"):
            evidence["dst_endpoint"] = _endpoint(net["local"])
        evidence["connection_info"] = _connection_info(net, 2)
    if record.get("dns"):
        evidence["query"] = {"hostname": record["dns"].get("query") or "", "class": "IN"}
    if record.get("file"):
        fp = record["file"].get("path") or record["file"].get("raw_path") or ""
        evidence["file"] = {"name": fp.rsplit("/", 1)[-1], "path": fp, "type_id": 0, "type": "Unknown"}
    if evidence:
        ev["evidences"] = [evidence]
    _unmapped(ev, "rule", {k: rule[k] for k in ("action", "outcome", "tags", "category") if k in rule})
    for k in ("net", "flow", "dns", "gpu", "device", "file"):
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
    ev["actor"] = _actor(record.get("proc"))
    path = f.get("path") or f.get("raw_path") or ""
    ev["file"] = {"name": path.rsplit("/", 1)[-1], "path": path, "type_id": 0, "type": "Unknown"}
    killed = f.get("verdict") == "killed"
    ev["action_id"], ev["action"] = (2, "Denied") if killed else (1, "Allowed")
    ev["disposition_id"], ev["disposition"] = (7, "Custom Action") if killed else (1, "Allowed")
    ev.setdefault("device", {"type_id": 0, "type": "Unknown"})
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
    return ev


def _other(record: dict) -> dict:
    kind = str(record.get("kind") or "")
    ev = _base(record, 0, 99, kind or "Other")
    for k, v in record.items():
        if k not in ("ts", "kind", "node", "agent"):
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
