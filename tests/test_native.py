"""The compiled pipeline modules (scripts/build_native.py, tracer/native.py): `agenttrace run`
says which modules run compiled; a module whose source no longer matches the build loads pure
(never old code) and says so; AGENTTRACE_REQUIRE_NATIVE=1 refuses to start without the build;
the golden records are the same bytes on both paths."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from conftest import AGENTTRACE

TESTS = Path(__file__).resolve().parent
# what every record passes through: `run` imports these before its `started` record
CORE = {"agenttrace.kernel.ringbuf", "agenttrace.enrich.enricher", "agenttrace.enrich.proctable",
        "agenttrace.session.pipeline", "agenttrace.sinks.outputs"}


@pytest.fixture
def build() -> Path:
    """The venv's native build (setup.sh makes it); required when AGENTTRACE_REQUIRE_NATIVE=1."""
    from agenttrace import native
    d = Path(native.native_dir())
    if not (d / "manifest.json").is_file():
        msg = f"no native build at {d} (scripts/build_native.py)"
        if os.environ.get("AGENTTRACE_REQUIRE_NATIVE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return d


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTTRACE_NATIVE")
           and k != "AGENTTRACE_REQUIRE_NATIVE"}
    env.update(kw)
    return env


def _run_true(env) -> tuple[subprocess.CompletedProcess, dict | None]:
    r = subprocess.run([AGENTTRACE, "run", "--", "/bin/true"], capture_output=True, env=env, timeout=120)
    started = None
    for line in r.stdout.splitlines():
        rec = orjson.loads(line)
        if rec.get("kind") == "lifecycle" and rec.get("phase") == "started":
            started = rec
    return r, started


def test_started_record_lists_the_compiled_modules(require_bpf, build):
    manifest = json.loads((build / "manifest.json").read_text())
    r, started = _run_true(_env())
    assert r.returncode == 0, r.stderr.decode()
    assert started is not None, r.stdout.decode()[-2000:]
    nat = started["native"]
    assert nat["enabled"] is True
    assert CORE <= set(nat["loaded"]) <= set(manifest["modules"]), nat
    assert "stale" not in nat, nat

    r, started = _run_true(_env(AGENTTRACE_NATIVE="0"))
    assert r.returncode == 0, r.stderr.decode()
    assert started["native"] == {"enabled": False, "loaded": [], "reason": "AGENTTRACE_NATIVE=0"}


def test_a_source_edited_after_the_build_loads_pure_and_says_so(require_bpf, build, tmp_path):
    # the build as it is, with one module's recorded source hash no longer that of its .py
    # (what editing render.py after setup amounts to)
    d = tmp_path / "native"
    shutil.copytree(build, d)
    m = json.loads((d / "manifest.json").read_text())
    m["modules"]["agenttrace.sinks.render"]["source_sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    r, started = _run_true(_env(AGENTTRACE_NATIVE_DIR=str(d)))
    assert r.returncode == 0, r.stderr.decode()
    nat = started["native"]
    assert nat["stale"] == {"agenttrace.sinks.render": "source changed since the build"}, nat
    assert "agenttrace.sinks.render" not in nat["loaded"]
    assert CORE <= set(nat["loaded"]), nat          # the others still run compiled

    # and with the REQUIRE flag that is an error at start, naming the module
    r, started = _run_true(_env(AGENTTRACE_NATIVE_DIR=str(d), AGENTTRACE_REQUIRE_NATIVE="1"))
    assert r.returncode == 2, (r.returncode, r.stderr.decode())
    assert started is None
    assert b"agenttrace.sinks.render (source changed since the build)" in r.stderr, r.stderr.decode()


def test_a_module_compiled_against_a_stale_ones_c_types_loads_pure_too(require_bpf, build, tmp_path):
    # enricher.pxd cimports the process table's C types: with proctable.py edited after the build
    # (its pure copy loads), the compiled enricher would read pure Proc objects as C structs. Both
    # load pure, say why, and the run's records are still right
    m = json.loads((build / "manifest.json").read_text())
    dep = "agenttrace.enrich.proctable"
    users = sorted(k for k, v in m["modules"].items() if dep in v.get("cimports", ()))
    assert "agenttrace.enrich.enricher" in users, m["modules"]["agenttrace.enrich.enricher"]
    d = tmp_path / "native"
    shutil.copytree(build, d)
    m["modules"][dep]["source_sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    r, started = _run_true(_env(AGENTTRACE_NATIVE_DIR=str(d)))
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    nat = started["native"]
    assert nat["stale"] == {dep: "source changed since the build",
                            **{u: f"compiled against {dep}, which loads as pure Python" for u in users}}, nat
    assert not set(users) & set(nat["loaded"]), nat
    assert "agenttrace.session.pipeline" in nat["loaded"], nat      # the rest still run compiled
    execs = [orjson.loads(x) for x in r.stdout.splitlines() if b'"kind":"exec"' in x]
    assert any(e["proc"]["exe"] == "/bin/true" and e["proc"]["ancestry"] for e in execs), r.stdout.decode()[-2000:]


_TYPES = """
import json, sys
from agenttrace.enrich import activity, enricher, exeid, proctable, procshare
from agenttrace.session import event
HEAP = 1 << 9       # Py_TPFLAGS_HEAPTYPE: a class statement's type; a cdef class's is static
kinds = {c.__qualname__: not (c.__flags__ & HEAP) for c in (
    proctable.Proc, proctable.ProcTable, event.Event, activity.Activity, activity.Actor,
    enricher.Enricher, exeid.ExeIdentifier, procshare.SharedProcs)}
p = proctable.Proc(7)
e = enricher.Enricher.__new__(enricher.Enricher)
e.set_by_the_session = 1        # what the session builder and stand-ins rely on
print(json.dumps({"c_types": kinds, "proc_dict": hasattr(p, "__dict__"),
                  "proc_bytes": proctable.Proc.__basicsize__, "enricher_attr": e.set_by_the_session}))
"""


def test_the_per_record_objects_are_c_types_when_compiled(build):
    # the .pxd files (bench/profiles/htyped-enrich.md): a process table entry is a C struct with
    # no instance dict (memory per process, attribute reads from C), the enricher keeps one
    out = {}
    for native_on in (True, False):
        env = _env() if native_on else _env(AGENTTRACE_NATIVE="0")
        r = subprocess.run([sys.executable, "-c", _TYPES], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        out[native_on] = json.loads(r.stdout.splitlines()[-1])
    assert all(out[True]["c_types"].values()), out[True]
    assert not any(out[False]["c_types"].values()), out[False]
    for o in out.values():
        assert o["proc_dict"] is False and o["enricher_attr"] == 1, o
    # no larger than the pure class's __slots__ layout
    assert out[True]["proc_bytes"] <= out[False]["proc_bytes"], out


def test_require_native_without_a_build_exits_2(require_bpf, tmp_path):
    r, started = _run_true(_env(AGENTTRACE_NATIVE_DIR=str(tmp_path / "none"), AGENTTRACE_REQUIRE_NATIVE="1"))
    assert r.returncode == 2, (r.returncode, r.stderr.decode())
    assert started is None
    err = r.stderr.decode()
    assert "AGENTTRACE_REQUIRE_NATIVE=1" in err and "no native build" in err and "build_native.py" in err, err
    assert "Traceback" not in err, err
    # without the flag the same missing build is pure Python, and says why
    r, started = _run_true(_env(AGENTTRACE_NATIVE_DIR=str(tmp_path / "none")))
    assert r.returncode == 0, r.stderr.decode()
    assert started["native"]["loaded"] == [] and "no native build" in started["native"]["reason"]


_GOLDEN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import pipeline_golden as G, test_pipeline_golden as T
from agenttrace import native
out = {}
for fmt, path in (("json", G.GOLDEN_JSON), ("ocsf", G.GOLDEN_OCSF)):
    out[fmt] = b"".join(G.run(fmt)) == T._golden(path)
out["native"] = native.status()
print(json.dumps(out))
"""


@pytest.mark.parametrize("native_on", [True, False], ids=["compiled", "pure"])
def test_golden_records_on_both_paths(native_on, build):
    env = _env() if native_on else _env(AGENTTRACE_NATIVE="0")
    r = subprocess.run([sys.executable, "-c", _GOLDEN, str(TESTS)], capture_output=True, env=env,
                       timeout=300, cwd=TESTS)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    out = json.loads(r.stdout.decode().splitlines()[-1])
    assert out["json"] and out["ocsf"], out
    if native_on:
        assert {"agenttrace.session.pipeline", "agenttrace.enrich.enricher", "agenttrace.match.engine",
                "agenttrace.sinks.outputs"} <= set(out["native"]["loaded"]), out["native"]
    else:
        assert out["native"]["loaded"] == [], out["native"]


def test_a_pxd_beside_a_module_is_compiled_in_and_rebuilds_when_it_changes(tmp_path, monkeypatch):
    # typed declarations for the compiled build only live in <module>.pxd beside the .py: the
    # manifest carries the .pxd's hash, so editing one rebuilds (and Cython must find it by the
    # package name the module is imported as, not the tree's folder name `tracer`)
    sys.path.insert(0, str(TESTS.parent / "scripts"))
    try:
        import build_native as B
    finally:
        sys.path.pop(0)
    tree = tmp_path / "src"
    shutil.copytree(TESTS.parent / "tracer", tree / "tracer", ignore=shutil.ignore_patterns("__pycache__", "*.pxd"))
    monkeypatch.setattr(B, "ROOT", tree)
    mod = "agenttrace.enrich.decodecache"
    assert "pxd_sha256" not in B.entry(mod)
    pxd = tree / "tracer" / "enrich" / "decodecache.pxd"
    pxd.write_text("cdef class DecodeCache:\n    cdef dict _argv\n    cdef dict _text\n")
    first = B.entry(mod)
    assert first["pxd_sha256"] == B.sha256(pxd)
    pxd.write_text("cdef class DecodeCache:\n    cdef dict _argv\n    cdef public dict _text\n")
    assert B.entry(mod)["pxd_sha256"] != first["pxd_sha256"]
    # compiled with it: `_argv` is a C field Python cannot see, `_text` the public one
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    pytest.importorskip("Cython")
    import sysconfig
    out = tmp_path / "decodecache.so"
    B.build_one(mod, _linked(tmp_path / "build", tree), out, sysconfig.get_paths()["include"])
    probe = subprocess.run([sys.executable, "-c", (
        "import importlib.machinery as M, importlib.util as U, sys\n"
        f"spec = U.spec_from_file_location({mod!r}, {str(out)!r}, loader=M.ExtensionFileLoader({mod!r}, {str(out)!r}))\n"
        "m = U.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "c = m.DecodeCache(); print(type(c._text).__name__, hasattr(c, '_argv'))")],
        capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["dict", "False"], probe.stdout


def _linked(tmp: Path, tree: Path) -> Path:
    tmp.mkdir()
    os.symlink(tree / "tracer", tmp / "agenttrace")
    return tmp
