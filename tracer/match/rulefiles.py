"""Which files a rule set is read from, without the loader's imports (pydantic, YAML, CEL):
the session names them before the rules are parsed (tracer/session/probeplan.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Union

from agenttrace.paths import rules_dir


def expand_paths(paths: Iterable[Union[str, os.PathLike]]) -> List[str]:
    out: List[str] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(str(f) for f in sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")))
        else:
            out.append(str(p))
    return out


def default_rule_paths() -> List[str]:
    return expand_paths([rules_dir()])
