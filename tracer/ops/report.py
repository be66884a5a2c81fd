"""`agenttrace report EVENTS.jsonl [--html FILE]`: what each agent (episode) did, for a person.

The terminal form is a timeline per agent: its labels, counts, then one line per record
(processes, connections, DNS, GPU, alerts highlighted). The HTML form is one self-contained
page — no script, style or font is fetched from anywhere — with, per agent, a timeline chart
(events by kind over time, alerts marked, GPU memory and SM use as lines), the alerts with
the process tree that led to each, and a searchable table of every record.

Everything shown comes from the records, and every string from a record is escaped: agents
choose their argv, names and labels.
"""
from __future__ import annotations

import html
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import orjson

from agenttrace.match.engine import describe_event
from agenttrace.timefmt import parse_ns

ROWS = ("alert", "exec", "fork", "exit", "connect", "listen", "dns", "flow", "file", "device", "gpu")
SEV_RANK = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
MAX_MARKS = 4000          # timeline marks per agent; past it, marks are thinned (counts stay exact)


class ReportInputError(ValueError):
    """A line that is not a JSON object record: names file and line."""


@dataclass
class AgentRun:
    key: tuple
    ident: dict
    records: list = field(default_factory=list)
    summary: Optional[dict] = None

    @property
    def name(self) -> str:
        base = str(self.ident.get("id") or self.ident.get("cgroup_id") or "?")
        ep = self.ident.get("episode")
        return f"{base} · {ep}" if ep is not None and str(ep) != base else base

    def labels(self) -> dict:
        skip = {"id", "cgroup", "cgroup_id", "container", "pod"}
        return {k: v for k, v in self.ident.items() if k not in skip and not isinstance(v, (dict, list))}


def load(path: str) -> list[dict]:
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise ReportInputError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(rec, dict) or "kind" not in rec or "ts" not in rec:
                raise ReportInputError(f"{path}:{n}: not an agenttrace record (needs 'kind' and 'ts')")
            try:
                rec["_t"] = parse_ns(rec["ts"])
            except (ValueError, TypeError):
                raise ReportInputError(f"{path}:{n}: field 'ts': {rec['ts']!r} is not an RFC 3339 time") from None
            out.append(rec)
    return out


def group(records: Iterable[dict]) -> tuple[list[AgentRun], list[dict]]:
    """Per-agent runs (first appearance order) and the tracer's own records."""
    runs: "OrderedDict[tuple, AgentRun]" = OrderedDict()
    node = []
    for r in records:
        a = r.get("agent")
        if not isinstance(a, dict):
            node.append(r)
            continue
        # an agent cgroup reused for several episodes (labels changed in between) shows as one
        # timeline per episode: that is the unit a trainer thinks in
        key = (a.get("id"), a.get("cgroup_id"), a.get("episode"))
        run = runs.get(key)
        if run is None:
            run = runs[key] = AgentRun(key, a)
        run.ident = a                    # the latest labels (they may change during a run)
        if r.get("kind") == "summary":
            run.summary = r
        else:
            run.records.append(r)
    for run in runs.values():
        run.records.sort(key=lambda r: r["_t"])
    return list(runs.values()), node


def _alert_line(r: dict) -> str:
    rule = r.get("rule") or {}
    return (f"[{rule.get('severity', '?')}] {rule.get('id', '?')} ({rule.get('outcome', '?')}): "
            f"{rule.get('message', '')}")


def describe(r: dict) -> str:
    kind = r.get("kind")
    if kind == "alert":
        return _alert_line(r)
    if kind == "exit":
        p = r.get("proc") or {}
        sig = f", signal {r['signal']}" if r.get("signal") else ""
        return f"exit {p.get('comm', '?')} ({p.get('pid')}) code {r.get('exit_code')}{sig}"
    if kind == "fork":
        p = r.get("proc") or {}
        return f"fork {p.get('comm', '?')} → pid {p.get('pid')}"
    if kind == "connect":
        net = r.get("net") or {}
        return describe_event(r) + f" [{net.get('verdict')}/{net.get('result')}]"
    if kind == "gpu":
        g = r.get("gpu") or {}
        return describe_event(r) + (f" {g.get('change')}" if g.get("change") else "")
    return describe_event(r)


def _safe(s: str) -> str:
    """Terminal-safe: control characters from agents are shown escaped, never interpreted."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in s)


def _counts_line(run: AgentRun) -> str:
    kinds = Counter(r["kind"] for r in run.records)
    return ", ".join(f"{k} {n}" for k, n in kinds.most_common())


def terminal(runs: list[AgentRun], out: Callable[[str], None], color: bool = False, limit: int = 200) -> None:
    red = (lambda s: f"\x1b[1;31m{s}\x1b[0m") if color else (lambda s: s)
    bold = (lambda s: f"\x1b[1m{s}\x1b[0m") if color else (lambda s: s)
    if not runs:
        out("no agent records")
    for run in runs:
        recs = run.records
        labels = " ".join(f"{k}={v}" for k, v in run.labels().items())
        ctr = run.ident.get("container") or {}
        extra = f"  container={ctr.get('runtime')}:{str(ctr.get('id'))[:12]}" if ctr else ""
        out(bold(_safe(f"== agent {run.name}  {labels}{extra}  {run.ident.get('cgroup') or ''}")))
        if recs:
            t0, t1 = recs[0]["_t"], recs[-1]["_t"]
            alerts = [r for r in recs if r["kind"] == "alert"]
            out(f"   {recs[0]['ts']} → {recs[-1]['ts']} ({(t1 - t0) / 1e9:.3f} s), {len(recs)} records: "
                f"{_counts_line(run)}; alerts {len(alerts)}")
        else:
            t0 = 0
        if run.summary is not None:
            s = run.summary["summary"]
            root = s.get("root") or {}
            gpus = ", ".join("%s: %s s, peak %s MiB" % (g.get("index"), g.get("seconds"), g.get("peak_memory_mib"))
                             for g in s.get("gpu") or []) or "-"
            out(_safe(f"   summary ({s.get('reason')}): root {root.get('exe')} exit {root.get('exit_code')}, "
                      f"{s.get('processes', {}).get('execs')} execs, {s.get('alerts')} alerts, "
                      f"{s.get('destinations', {}).get('distinct')} destinations, GPU {gpus}"))
        for i, r in enumerate(recs):
            if i >= limit:
                out(f"   … {len(recs) - limit} more records (use --limit)")
                break
            line = f"   +{(r['_t'] - t0) / 1e9:9.3f}s  {r['kind']:<8} {_safe(describe(r))[:200]}"
            out(red(line) if r["kind"] == "alert" else line)
        out("")


# ---------------------------------------------------------------------------- HTML

def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _proc_label(p: dict) -> str:
    args = " ".join(p.get("args") or []) or p.get("exe") or ""
    return f"{p.get('pid')} {p.get('comm') or ''} — {args[:200]}"


def process_tree(alert: dict, by_exec: dict) -> list[dict]:
    """Root-first chain of processes that led to the alert's process: joined by
    parent_exec_id where the records have it, else the alert's own ancestry list."""
    p = alert.get("proc")
    if not isinstance(p, dict):
        return []
    chain = [p]
    seen = {p.get("exec_id")}
    cur = p
    while cur.get("parent_exec_id") and cur["parent_exec_id"] in by_exec and len(chain) < 32:
        cur = by_exec[cur["parent_exec_id"]]
        if cur.get("exec_id") in seen:
            break
        seen.add(cur.get("exec_id"))
        chain.append(cur)
    if len(chain) == 1:
        # no exec record of the parent here (it started outside the agent, or before the
        # trace): the ancestry the record carries, marked as not seen in this file
        chain += [dict(a, _outside=a.get("exec_id") not in by_exec)
                  for a in (p.get("ancestry") or []) if isinstance(a, dict)]
    return list(reversed(chain))


def _tree_html(chain: list[dict]) -> str:
    if not chain:
        return "<p class=muted>no process</p>"
    out = []
    for i, p in enumerate(chain):
        cls = ' class="culprit"' if i == len(chain) - 1 else (' class="outside"' if p.get("_outside") else "")
        note = ' <span class="muted">(no record in this file)</span>' if p.get("_outside") else ""
        out.append(f"<ul><li{cls}><code>{_e(_proc_label(p))}</code>{note}")
    out.append("</li></ul>" * len(chain))
    return "".join(out)


def _gpu_points(recs: list[dict]) -> list[tuple[int, float, float]]:
    pts = []
    for r in recs:
        g = r.get("gpu") if r["kind"] == "gpu" else (r.get("proc") or {}).get("gpu")
        if isinstance(g, dict):
            mem = g.get("used_memory_mib")
            sm = g.get("sm_util_pct")
            if r["kind"] == "gpu" and g.get("change") == "released":
                mem, sm = 0, 0
            if isinstance(mem, (int, float)) or isinstance(sm, (int, float)):
                pts.append((r["_t"], float(mem or 0), float(sm or 0)))
    return pts


def _timeline_svg(run: AgentRun, idx: int) -> str:
    recs = run.records
    W, left, right, row_h = 1000, 70, 20, 18
    kinds = [k for k in ROWS if any(r["kind"] == k for r in recs)]
    others = sorted({r["kind"] for r in recs} - set(ROWS))
    kinds += others
    gpu = _gpu_points(recs)
    band = 70 if gpu else 0
    H = 30 + row_h * max(1, len(kinds)) + band + 25
    t0 = recs[0]["_t"] if recs else 0
    t1 = recs[-1]["_t"] if recs else 1
    span = max(1, t1 - t0)

    def x(t):
        return left + (W - left - right) * (t - t0) / span

    parts = [f'<svg class="timeline" data-agent="{_e(run.name)}" id="timeline-{idx}" viewBox="0 0 {W} {H}" '
             f'width="100%" role="img" aria-label="timeline of agent {_e(run.name)}">']
    y_of = {k: 30 + row_h * i + row_h / 2 for i, k in enumerate(kinds)}
    for k, y in y_of.items():
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="rowlabel">{_e(k)}</text>'
                     f'<line x1="{left}" x2="{W - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
    step = max(1, len(recs) // MAX_MARKS)
    for i, r in enumerate(recs):
        k = r["kind"]
        if k != "alert" and i % step:
            continue
        cx, cy = x(r["_t"]), y_of[k]
        tip = f"<title>{_e(r['ts'])} {_e(describe(r)[:300])}</title>"
        if k == "alert":
            sev = (r.get("rule") or {}).get("severity", "info")
            parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="24" y2="{H - 25}" class="alertline"/>'
                         f'<path class="alert sev-{_e(sev)}" d="M{cx:.1f},{cy - 7:.1f} l6,12 h-12 z">{tip}</path>')
        else:
            cls = "mark blocked" if (r.get("net") or {}).get("verdict") == "blocked" else f"mark k-{_e(k)}"
            parts.append(f'<circle class="{cls}" cx="{cx:.1f}" cy="{cy:.1f}" r="3.5">{tip}</circle>')
    if gpu:
        top = 30 + row_h * max(1, len(kinds)) + 8
        peak = max(m for _, m, _ in gpu) or 1.0
        mem_pts, sm_pts = [], []
        prev = None
        for t, m, s in gpu:
            if prev is not None:          # a step line: the value holds until the next sample
                mem_pts.append(f"{x(t):.1f},{top + band - 10 - (band - 10) * prev[0] / peak:.1f}")
                sm_pts.append(f"{x(t):.1f},{top + band - 10 - (band - 10) * prev[1] / 100:.1f}")
            mem_pts.append(f"{x(t):.1f},{top + band - 10 - (band - 10) * m / peak:.1f}")
            sm_pts.append(f"{x(t):.1f},{top + band - 10 - (band - 10) * s / 100:.1f}")
            prev = (m, s)
        parts.append(f'<text x="{left - 6}" y="{top + 12}" class="rowlabel">GPU</text>'
                     f'<rect x="{left}" y="{top}" width="{W - left - right}" height="{band - 10}" class="gpuband"/>'
                     f'<polyline class="gpumem" points="{" ".join(mem_pts)}"><title>GPU memory, peak {peak:g} MiB</title></polyline>'
                     f'<polyline class="gpusm" points="{" ".join(sm_pts)}"><title>SM use %</title></polyline>'
                     f'<text x="{W - right}" y="{top - 2}" class="legend" text-anchor="end">'
                     f'<tspan class="gpumem-t">memory (peak {peak:g} MiB)</tspan> · <tspan class="gpusm-t">SM %</tspan></text>')
    for i in range(6):
        t = t0 + span * i / 5
        parts.append(f'<text x="{x(t):.1f}" y="{H - 8}" class="tick" text-anchor="middle">+{(t - t0) / 1e9:.2f}s</text>')
    parts.append(f'<text x="{left}" y="16" class="tick">{_e(recs[0]["ts"] if recs else "")}</text></svg>')
    return "".join(parts)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header{background:#1d232b;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c5ccd6}main{padding:12px 24px}
section.agent,section.node{background:#fff;border:1px solid #d9dde3;border-radius:6px;margin:14px 0;padding:12px 16px}
section.agent h2,section.node h2{margin:0 0 4px;font-size:17px}.labels span{display:inline-block;background:#eef1f5;border-radius:3px;padding:0 6px;margin:0 4px 2px 0;font-size:12px}
.stats{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}.stat{background:#f1f3f6;border-radius:4px;padding:4px 8px;font-size:12px}
.stat b{font-size:15px;display:block}.stat.bad b{color:#b3261e}
svg.timeline{background:#fbfcfd;border:1px solid #e3e6ea;border-radius:4px;margin:6px 0}
.rowlabel{font-size:11px;text-anchor:end;fill:#58606b}.tick{font-size:10px;fill:#7a828d}.legend{font-size:10px;fill:#58606b}
.grid{stroke:#eceef1}.mark{fill:#3a6fb0;opacity:.75}.k-exec{fill:#2f7d4f}.k-exit{fill:#9aa3ad}.k-dns{fill:#8a5cc2}
.k-flow{fill:#c27c0e}.k-gpu{fill:#0b8a8a}.blocked{fill:#b3261e}.alert{fill:#d93025;stroke:#7a0f0a}
.sev-critical{fill:#7a0f0a}.sev-medium,.sev-low,.sev-info{fill:#e8a33d}.alertline{stroke:#d93025;stroke-dasharray:3 3;opacity:.35}
.gpuband{fill:#f2fafa;stroke:#dceeee}.gpumem{fill:none;stroke:#0b8a8a;stroke-width:2}.gpusm{fill:none;stroke:#c27c0e;stroke-width:1.5;stroke-dasharray:4 2}
.gpumem-t{fill:#0b8a8a}.gpusm-t{fill:#c27c0e}
table{border-collapse:collapse;width:100%;font-size:12px}th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eceef1;vertical-align:top}
th{background:#f1f3f6;position:sticky;top:0}tr.alert td{background:#fdecea}td code,li code{font-size:12px;word-break:break-all}
input.search{width:320px;padding:4px 8px;margin:6px 0;border:1px solid #c9ced6;border-radius:4px}
.scroll{max-height:360px;overflow:auto;border:1px solid #eceef1}details{margin:4px 0}summary{cursor:pointer}
ul{margin:2px 0 2px 12px;padding-left:12px;border-left:1px solid #d9dde3;list-style:none}li.culprit>code{background:#fdecea;font-weight:600}li.outside>code{color:#7a828d}
.muted{color:#7a828d}h3{font-size:14px;margin:12px 0 4px}
"""

_JS = """
document.querySelectorAll('input.search').forEach(function(box){
  var table=document.getElementById(box.dataset.table);
  box.addEventListener('input',function(){
    var q=box.value.toLowerCase(),n=0;
    table.querySelectorAll('tbody tr').forEach(function(tr){
      var hit=!q||tr.textContent.toLowerCase().indexOf(q)>=0;tr.style.display=hit?'':'none';if(hit)n++;});
    var c=document.getElementById(box.dataset.table+'-count');if(c)c.textContent=n+' shown';
  });
});
document.body.dataset.ready='1';
"""


def _stat(label: str, value, bad: bool = False) -> str:
    return f'<div class="stat{" bad" if bad else ""}"><b>{_e(value)}</b>{_e(label)}</div>'


def _agent_html(run: AgentRun, idx: int, by_exec: dict) -> str:
    recs = run.records
    alerts = [r for r in recs if r["kind"] == "alert"]
    kinds = Counter(r["kind"] for r in recs)
    labels = "".join(f"<span>{_e(k)}={_e(v)}</span>" for k, v in run.labels().items())
    ctr, pod = run.ident.get("container") or {}, run.ident.get("pod") or {}
    if ctr:
        labels += f"<span>container {_e(ctr.get('runtime'))}:{_e(str(ctr.get('id'))[:12])}</span>"
    if pod:
        labels += f"<span>pod {_e(pod.get('uid'))} ({_e(pod.get('qos'))})</span>"
    dur = (recs[-1]["_t"] - recs[0]["_t"]) / 1e9 if recs else 0
    stats = [_stat("records", len(recs)), _stat("seconds", f"{dur:.2f}"), _stat("execs", kinds.get("exec", 0)),
             _stat("connects", kinds.get("connect", 0)), _stat("dns", kinds.get("dns", 0)),
             _stat("alerts", len(alerts), bad=bool(alerts))]
    s = (run.summary or {}).get("summary")
    if s:
        root = s.get("root") or {}
        stats.append(_stat("root exit", root.get("exit_code")))
        stats.append(_stat("destinations", (s.get("destinations") or {}).get("distinct")))
        for g in s.get("gpu") or []:
            stats.append(_stat(f"GPU {g.get('index')} s / peak MiB", f"{g.get('seconds')} / {g.get('peak_memory_mib')}"))
    parts = [f'<section class="agent" id="agent-{idx}" data-agent="{_e(run.name)}">',
             f'<h2>{_e(run.name)} <span class="muted">{_e(run.ident.get("cgroup") or "")}</span></h2>',
             f'<div class="labels">{labels}</div><div class="stats">{"".join(stats)}</div>',
             _timeline_svg(run, idx)]
    if alerts:
        parts.append(f"<h3>Alerts ({len(alerts)})</h3>")
        for n, a in enumerate(sorted(alerts, key=lambda r: (-SEV_RANK.get((r.get("rule") or {}).get("severity"), 0), r["_t"]))):
            rule = a.get("rule") or {}
            parts.append(f'<details class="alert-detail"{" open" if n < 3 else ""}><summary><b>{_e(rule.get("severity"))}</b> '
                         f'{_e(rule.get("id"))} — {_e(rule.get("outcome"))} at {_e(a["ts"])}</summary>'
                         f'<p>{_e(rule.get("message"))}</p><div class="tree">'
                         f'{_tree_html(process_tree(a, by_exec))}</div></details>')
    if s:
        dest = (s.get("destinations") or {}).get("top") or []
        names = (s.get("dns_names") or {}).get("top") or []
        if dest or names:
            parts.append("<h3>Destinations and names</h3><table><thead><tr><th>destination</th><th>scope</th>"
                         "<th>name</th><th>count</th></tr></thead><tbody>")
            parts += [f"<tr><td>{_e(d.get('addr'))}:{_e(d.get('port'))}</td><td>{_e(d.get('scope'))}</td>"
                      f"<td>{_e(d.get('name'))}</td><td>{_e(d.get('count'))}</td></tr>" for d in dest]
            parts += [f"<tr><td></td><td>dns</td><td>{_e(n.get('name'))}</td><td>{_e(n.get('count'))}</td></tr>"
                      for n in names]
            parts.append("</tbody></table>")
    tid = f"records-{idx}"
    parts.append(f'<h3>Records</h3><input class="search" type="search" placeholder="search these records" '
                 f'data-table="{tid}" aria-label="search records of {_e(run.name)}"> '
                 f'<span class="muted" id="{tid}-count">{len(recs)} shown</span><div class="scroll">'
                 f'<table id="{tid}"><thead><tr><th>time</th><th>kind</th><th>pid</th><th>process</th>'
                 f'<th>what</th></tr></thead><tbody>')
    t0 = recs[0]["_t"] if recs else 0
    for r in recs:
        p = r.get("proc") or {}
        cls = ' class="alert"' if r["kind"] == "alert" else ""
        parts.append(f"<tr{cls}><td title=\"{_e(r['ts'])}\">+{(r['_t'] - t0) / 1e9:.3f}s</td><td>{_e(r['kind'])}</td>"
                     f"<td>{_e(p.get('pid'))}</td><td>{_e(p.get('comm'))}</td><td><code>{_e(describe(r)[:400])}</code></td></tr>")
    parts.append("</tbody></table></div></section>")
    return "".join(parts)


def html_page(runs: list[AgentRun], node_records: list[dict], source: str) -> str:
    by_exec = {}
    for run in runs:
        for r in run.records:
            p = r.get("proc")
            if isinstance(p, dict) and p.get("exec_id"):
                if r["kind"] in ("exec", "fork"):
                    by_exec[p["exec_id"]] = p
                else:
                    # fork records off (docs/MIGRATION.md): a fork-only process is known by
                    # the records it made
                    by_exec.setdefault(p["exec_id"], p)
    nodes = sorted({str(r.get("node")) for run in runs for r in run.records[:1]} |
                   {str(r.get("node")) for r in node_records if r.get("node")})
    n_rec = sum(len(r.records) for r in runs)
    n_alerts = sum(1 for run in runs for r in run.records if r["kind"] == "alert")
    head = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            f"script-src 'unsafe-inline'; img-src data:\">"
            f"<title>agenttrace report — {_e(os.path.basename(source))}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>agenttrace report</h1><p>{_e(source)} · node {_e(', '.join(nodes))} · "
            f"{len(runs)} agents · {n_rec} records · {n_alerts} alerts</p></header><main>")
    body = [_agent_html(run, i, by_exec) for i, run in enumerate(runs)]
    loose = [r for r in node_records if r.get("kind") == "alert"]
    if loose:       # e.g. a GPU held by a process in no agent cgroup
        body.append(f'<section class="node"><h2>Alerts outside any agent ({len(loose)})</h2><table><thead><tr>'
                    '<th>time</th><th>severity</th><th>rule</th><th>outcome</th><th>message</th></tr></thead><tbody>')
        for r in loose:
            rule = r.get("rule") or {}
            body.append(f"<tr class=alert><td>{_e(r['ts'])}</td><td>{_e(rule.get('severity'))}</td><td>{_e(rule.get('id'))}</td>"
                        f"<td>{_e(rule.get('outcome'))}</td><td>{_e(rule.get('message'))}</td></tr>")
        body.append("</tbody></table></section>")
    if not runs:
        body.append("<p>no agent records in this file</p>")
    return head + "".join(body) + f"</main><script>{_JS}</script></body></html>"


def run_report(path: str, html_out: Optional[str], out: Callable[[str], None], color: bool = False,
               limit: int = 200, agents: Optional[list] = None) -> int:
    records = load(path)
    runs, node = group(records)
    if agents:
        runs = [r for r in runs if str(r.ident.get("id")) in agents or str(r.ident.get("episode")) in agents]
    if html_out:
        page = html_page(runs, node, path)
        tmp = html_out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, html_out)
        out(f"wrote {html_out}: {len(runs)} agent timelines")
    else:
        terminal(runs, out, color=color, limit=limit)
    return 0
