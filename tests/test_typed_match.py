"""The typed build of the per-record path after enrichment (issue 15, branch htyped-match):
engine, pipeline bookkeeping, summaries and rendering carry C types from a .pxd beside their
.py, the compiled and the pure path give the same records, and a part an exec and its exit
share is rendered once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

TESTS = Path(__file__).resolve().parent
TYPED = ("agenttrace.match.engine", "agenttrace.session.pipeline", "agenttrace.session.summary",
         "agenttrace.sinks.render")


def test_a_part_shared_with_the_next_record_is_rendered_once():
    # an exec and its exit hold one proc dict (enrich/enricher.py): the exec's line already
    # embeds the fragment its exit reuses, so `default` (a frozenset here) runs once for the pair
    from agenttrace.sinks.outputs import _FAST_OPTS, _default
    from agenttrace.sinks.render import render_lines
    calls = []

    def default(o):
        calls.append(o)
        return _default(o)
    proc = {"pid": 7, "args": frozenset(["true"]), "ancestry": [{"pid": 1, "comm": "init"}]}
    agent = {"id": "a", "cgroup_id": 3}
    recs = [{"ts": "t0", "kind": "exec", "agent": agent, "proc": proc},
            {"ts": "t1", "kind": "exit", "agent": agent, "proc": proc, "exit_code": 0},
            {"ts": "t2", "kind": "exec", "agent": agent, "proc": dict(proc)}]
    got = render_lines(recs, default, _FAST_OPTS)
    assert got == [orjson.dumps(r, default=_default, option=_FAST_OPTS) for r in recs]
    assert len(calls) == 2          # the pair once, the third record (a copy) once
    assert recs[0]["proc"] is proc and recs[1]["proc"] is proc   # records untouched


def test_rendering_any_sharing_pattern_gives_the_plain_bytes():
    import random
    from agenttrace.sinks.outputs import _FAST_OPTS, _default
    from agenttrace.sinks.render import render_lines
    rnd = random.Random(26)
    parts = [None, "not a dict", {"pid": 1}, {"pid": 2, "a": frozenset("x")}, {"dst": {"port": 9}}]
    for _ in range(400):
        recs = []
        for i in range(rnd.randint(0, 9)):
            r = {"ts": f"t{i}", "kind": rnd.choice(["exec", "exit", "connect"])}
            for k in ("proc", "net"):
                c = rnd.randrange(len(parts) + 1)
                if c < len(parts):
                    r[k] = parts[c]
            recs.append(r)
        want = [orjson.dumps(r, default=_default, option=_FAST_OPTS) for r in recs]
        assert render_lines(recs, _default, _FAST_OPTS) == want, recs


def test_summaries_observe_batch_is_observe_per_record():
    from agenttrace.session.summary import Summaries
    agent = {"id": "a", "cgroup": "/a", "cgroup_id": 9}
    recs = [{"ts": f"2026-12-02T05:00:00.{i:09d}Z", "kind": k, "agent": agent,
             "proc": {"pid": 100 + i // 2, "ppid": 1, "exec_id": f"x{i}", "exe": "/bin/true", "args": ["true"]}}
            for i, k in enumerate(["exec", "exit"] * 20)]
    one, many = Summaries("n"), Summaries("n")
    for r in recs:
        one.observe(r)
    many.observe_batch(recs)
    assert one.finish(9, "t", 1)["summary"] == many.finish(9, "t", 1)["summary"]


_PROBE = r"""
import json, sys
from agenttrace import native
from agenttrace.session import summary
from agenttrace.session.summary import _Agent, _Pids, Summaries
a = _Agent({"id": "a"})
try:
    a.execs = "many"          # a C integer field refuses it; a slot would take it
    typed_counts = False
except TypeError:
    typed_counts = True
print(json.dumps({"loaded": sorted(native.status().get("loaded", [])), "typed_counts": typed_counts,
                  "descr": type(vars(_Agent)["execs"]).__name__}))
"""


def test_the_compiled_build_carries_the_typed_declarations():
    from agenttrace import native
    d = Path(native.native_dir())
    if not (d / "manifest.json").is_file():
        if os.environ.get("AGENTTRACE_REQUIRE_NATIVE") == "1":
            pytest.fail(f"no native build at {d}")
        pytest.skip(f"no native build at {d} (scripts/build_native.py)")
    manifest = json.loads((d / "manifest.json").read_text())
    for mod in TYPED:
        assert "pxd_sha256" in manifest["modules"][mod], mod
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTTRACE_NATIVE")}
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert "agenttrace.session.summary" in out["loaded"], out
    assert out["typed_counts"] and out["descr"] == "getset_descriptor", out
    # the pure path: the same classes as plain slotted ones
    env["AGENTTRACE_NATIVE"] = "0"
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["loaded"] == [] and not out["typed_counts"] and out["descr"] == "member_descriptor", out
