"""Compile the pipeline's hot modules, unchanged, with Cython into extension modules outside the
source tree (issue 15: the per-record cost is the interpreter's bytecode dispatch spread over a
flat profile, bench/profiles/hnative.md).

    <venv>/bin/python scripts/build_native.py [--out DIR] [--jobs N] [--force]

Writes DIR (default sys.prefix/lib/agenttrace-native) with agenttrace/<pkg>/<mod><EXT_SUFFIX> and
manifest.json: each module's source sha256, which tracer/native.py checks before it loads one.
Does nothing when the manifest already matches the sources, this Python and this Cython (setup
runs again and again). The .py files stay the source of truth: an edit after a build makes that
module load as pure Python until the next build.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Chosen from the profiles (hexec-live-gap, htcp-connect, hrate-udp-connect, hdec-python-cuts):
# the modules every record passes through. Measured in bench/profiles/hnative.md.
MODULES = [
    "agenttrace.kernel.ringbuf",
    "agenttrace.kernel.wire",
    "agenttrace.timefmt",
    "agenttrace.enrich.enricher",
    "agenttrace.enrich.proctable",
    "agenttrace.enrich.procshare",
    "agenttrace.enrich.exeid",
    "agenttrace.enrich.decodecache",
    "agenttrace.enrich.activity",
    "agenttrace.enrich.cgroups",     # AgentResolver.agent: every record's `agent`
    "agenttrace.match.engine",
    "agenttrace.match.celgate",
    "agenttrace.match.eqindex",
    "agenttrace.session.event",
    "agenttrace.session.pipeline",
    "agenttrace.session.summary",
    "agenttrace.sinks.render",
    "agenttrace.sinks.outputs",
]
# annotation_typing off: an annotation stays documentation, as in CPython (Cython would otherwise
# turn `x: float` into a C double and refuse None or an int subclass): same behaviour, both paths.
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True}
# -O1: the generated code is mostly calls into the C API, and the build must stay short (CI runs
# setup on 2 cores). -O2 measured against it (bench/profiles/htyped-ring.md): live exec storm
# 0.999x [0.90-1.02] of -O1's CPU, pipeline micro ~0.98x within its noise, for about twice the
# build time (137 s vs 72 s on the loaded 2-core VM).
CFLAGS = ["-O1", "-g0", "-fPIC", "-fwrapv", "-fno-strict-aliasing", "-DNDEBUG", "-w"]


def default_out() -> Path:
    return Path(sys.prefix) / "lib" / "agenttrace-native"


def source_of(mod: str) -> Path:
    return ROOT / "tracer" / Path(*mod.split(".")[1:]).with_suffix(".py")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pxd_of(mod: str) -> Path:
    """The optional augmenting declarations beside the source (C types for the compiled build
    only: the .py stays the pure fallback, bench/profiles/htyped.md)."""
    return source_of(mod).with_suffix(".pxd")


_CIMPORT = re.compile(r"^\s*(?:from\s+(agenttrace(?:\.\w+)+)\s+cimport\b|cimport\s+(agenttrace(?:\.\w+)+))", re.M)


def cimports(pxd: Path) -> list[str]:
    """The agenttrace modules a .pxd takes C types from (`from agenttrace.x cimport T`)."""
    return sorted({a or b for a, b in _CIMPORT.findall(pxd.read_text())})


def entry(mod: str) -> dict:
    e = {"source_sha256": sha256(source_of(mod)),
         "file": "/".join(mod.split(".")) + sysconfig.get_config_var("EXT_SUFFIX")}
    pxd = pxd_of(mod)
    if pxd.is_file():
        # not checked at load (the .so is the .py compiled either way); a changed .pxd rebuilds
        e["pxd_sha256"] = sha256(pxd)
        # checked at load: a module compiled against another's C types must not run beside that
        # module's pure copy (tracer/native.py)
        deps = [d for d in cimports(pxd) if d != mod]
        if deps:
            e["cimports"] = deps
    return e


def want_manifest(cython_version: str) -> dict:
    return {"python": sys.implementation.cache_tag, "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
            "cython": cython_version, "cflags": CFLAGS,
            "modules": {m: entry(m) for m in MODULES}}


def up_to_date(out: Path, want: dict) -> bool:
    try:
        have = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if have != want:
        return False
    return all((out / v["file"]).is_file() for v in want["modules"].values())


def build_one(mod: str, tmp: Path, out_file: Path, include: str) -> str:
    c = tmp / (mod + ".c")
    # compiled through tmp/agenttrace -> tracer, so Cython finds each module's .pxd (and one
    # module's cimport of another's) by its package name, as it is imported
    src = tmp.joinpath("agenttrace", *mod.split(".")[1:]).with_suffix(".py")
    cmd = [sys.executable, "-m", "cython", "-3", "-I", str(tmp), "--module-name", mod, "-o", str(c), str(src)]
    for k, v in DIRECTIVES.items():
        cmd += ["-X", f"{k}={v}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cython {mod}: {r.stderr.strip()[-2000:]}")
    so = tmp / (mod + ".so")
    r = subprocess.run([os.environ.get("CC", "gcc"), "-shared", *CFLAGS, "-I", include, str(c), "-o", str(so)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cc {mod}: {r.stderr.strip()[-2000:]}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    os.replace(so, out_file)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="copy this build instead when its manifest matches (the deb reuses the venv's)")
    a = ap.parse_args(argv)
    out = a.out or default_out()
    try:
        import Cython
    except ImportError:
        print("build_native: Cython is not installed in this Python (pip install cython)", file=sys.stderr)
        return 2
    want = want_manifest(Cython.__version__)
    if not a.force and up_to_date(out, want):
        print(f"build_native: {out} matches the sources ({len(MODULES)} modules)", file=sys.stderr)
        return 0
    if a.reuse is not None and not a.force and up_to_date(a.reuse, want):
        (out / "manifest.json").unlink(missing_ok=True)
        for v in want["modules"].values():
            (out / v["file"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(a.reuse / v["file"], out / v["file"])
        shutil.copy2(a.reuse / "manifest.json", out / "manifest.json")
        print(f"build_native: copied {a.reuse} (it matches the sources)", file=sys.stderr)
        return 0
    t0 = time.monotonic()
    include = sysconfig.get_paths()["include"]
    # the old manifest goes first: a build cut short leaves no manifest, so nothing loads
    (out / "manifest.json").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="agenttrace-native-") as tmp:
        os.symlink(ROOT / "tracer", Path(tmp) / "agenttrace")
        with cf.ThreadPoolExecutor(max(1, a.jobs)) as ex:
            futs = [ex.submit(build_one, m, Path(tmp), out / want["modules"][m]["file"], include)
                    for m in MODULES]
            errs = [str(f.exception()) for f in futs if f.exception() is not None]
    if errs:
        print("build_native: failed:\n" + "\n".join(errs), file=sys.stderr)
        return 1
    # sources edited while we built: hash again, so the manifest never vouches for a newer file
    want2 = want_manifest(Cython.__version__)
    if want2 != want:
        print("build_native: sources changed during the build; run it again", file=sys.stderr)
        return 1
    tmpm = out / "manifest.json.tmp"
    tmpm.write_text(json.dumps(want, indent=1, sort_keys=True) + "\n")
    os.replace(tmpm, out / "manifest.json")
    print(f"build_native: {len(MODULES)} modules into {out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
