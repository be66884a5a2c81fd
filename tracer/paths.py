"""Where the data folders are, whether installed from a wheel or editable from the repo."""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    # In a wheel, package-dir maps probes/ and rules/ inside the agenttrace package; in an
    # editable install the package is tracer/ and they sit beside it.
    for cand in (_HERE / name, _HERE.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"agenttrace data folder '{name}' not found next to {_HERE}")


def probes_dir() -> Path:
    return _data_dir("probes")


def rules_dir() -> Path:
    return _data_dir("rules")


def schema_dir() -> Path:
    return _HERE / "schema"
