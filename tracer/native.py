"""Loads the Cython-compiled copies of the hot modules (scripts/build_native.py), never stale ones.

A compiled module is used only when the manifest's sha256 of its source equals the .py file that
would otherwise be imported: after an edit that module is pure Python (and `status()` says so)
until the next build, so no one ever runs old code. AGENTTRACE_NATIVE=0: everything pure.
AGENTTRACE_REQUIRE_NATIVE=1: a missing, stale or partial build is an error at start (CI must not
measure pure Python by accident). AGENTTRACE_NATIVE_DIR: the build's folder (default
sys.prefix/lib/agenttrace-native).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
from importlib.util import spec_from_file_location

_state: dict = {"enabled": False, "dir": None, "reason": None, "loaded": [], "stale": {}, "modules": []}


class NativeError(RuntimeError):
    """AGENTTRACE_REQUIRE_NATIVE=1 and a compiled module could not be used."""


def native_dir() -> str:
    return os.environ.get("AGENTTRACE_NATIVE_DIR") or os.path.join(sys.prefix, "lib", "agenttrace-native")


class _Finder:
    """A meta-path finder for the manifest's modules only; every other import is not its concern."""

    def __init__(self, root: str, manifest: dict):
        self.root = root
        self.modules = manifest.get("modules", {})

    def find_spec(self, fullname, path=None, target=None):
        entry = self.modules.get(fullname)
        if entry is None or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        src = next((os.path.join(p, leaf + ".py") for p in path
                    if os.path.isfile(os.path.join(p, leaf + ".py"))), None)
        if src is None:
            return None
        why = self._why_not(fullname, src, set())
        if why is not None:
            if why:
                _stale(fullname, why)
            return None
        so = os.path.join(self.root, entry["file"])
        spec = spec_from_file_location(fullname, so, loader=ExtensionFileLoader(fullname, so))
        if spec is None:
            return None
        _state["loaded"].append(fullname)
        return spec

    def _why_not(self, fullname: str, src: str, seen: set) -> str | None:
        """None when the compiled copy of `fullname` matches its source `src` and may run; else
        why not ('' for an unreadable source, which the normal import reports itself)."""
        entry = self.modules.get(fullname)
        if entry is None:
            return "not in the build"
        try:
            with open(src, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return ""
        if digest != entry.get("source_sha256"):
            return "source changed since the build"
        if not os.path.isfile(os.path.join(self.root, entry["file"])):
            return "compiled file missing"
        seen.add(fullname)
        up = [".."] * (fullname.count(".") - 1)
        for dep in entry.get("cimports", ()):
            if dep in seen:
                continue
            # compiled against dep's C types: beside dep's pure copy its typed code would read a
            # Python object as that C struct, so the two run compiled together or not at all
            dsrc = os.path.normpath(os.path.join(os.path.dirname(src), *up, *dep.split(".")[1:]) + ".py")
            if self._why_not(dep, dsrc, seen) is not None:
                return f"compiled against {dep}, which loads as pure Python"
        return None


def _stale(name: str, why: str) -> None:
    _state["stale"][name] = why


def install() -> None:
    """Called once from agenttrace/__init__.py, before any submodule is imported."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    root = native_dir()
    _state["dir"] = root
    if os.environ.get("AGENTTRACE_NATIVE", "1") == "0":
        _state["reason"] = "AGENTTRACE_NATIVE=0"
        return
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        _state["reason"] = f"no native build at {root} ({type(e).__name__})"
        return
    if manifest.get("ext_suffix") not in EXTENSION_SUFFIXES:
        _state["reason"] = f"{root} was built for another Python ({manifest.get('python')})"
        return
    _state["enabled"] = True
    _state["modules"] = sorted(manifest.get("modules", {}))
    sys.meta_path.insert(0, _Finder(root, manifest))


def status() -> dict:
    """What the `started` record and `agenttrace doctor` show: which modules run compiled."""
    out = {"enabled": _state["enabled"], "loaded": sorted(_state["loaded"])}
    if _state["stale"]:
        out["stale"] = dict(sorted(_state["stale"].items()))
    if _state["reason"]:
        out["reason"] = _state["reason"]
    if _state["enabled"]:
        # built but not (yet) imported by this process: neither compiled nor stale
        out["not_imported"] = [m for m in _state["modules"] if m not in _state["loaded"] and m not in _state["stale"]]
    return out


def check_required() -> None:
    """AGENTTRACE_REQUIRE_NATIVE=1 (the CLI calls this before any command): every built module is
    imported now and must be the compiled one, else NativeError with what to do."""
    if os.environ.get("AGENTTRACE_REQUIRE_NATIVE") != "1":
        return
    fix = "run scripts/build_native.py (or scripts/setup.sh), or unset AGENTTRACE_REQUIRE_NATIVE"
    if not _state["enabled"]:
        raise NativeError(f"AGENTTRACE_REQUIRE_NATIVE=1 but no compiled modules: {_state['reason']}; {fix}")
    import importlib
    for m in _state["modules"]:
        importlib.import_module(m)
    if _state["stale"]:
        raise NativeError("AGENTTRACE_REQUIRE_NATIVE=1 but these load as pure Python: "
                          + ", ".join(f"{m} ({why})" for m, why in sorted(_state["stale"].items())) + f"; {fix}")
    pure = [m for m in _state["modules"] if m not in _state["loaded"]]
    if pure:
        raise NativeError(f"AGENTTRACE_REQUIRE_NATIVE=1 but imported as pure Python: {', '.join(pure)}; {fix}")
