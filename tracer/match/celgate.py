"""Deciding a CEL condition without calling CEL, when its first conjunct already decides it.

A CEL evaluation costs ~10-25 µs (bench/pipeline_micro.py); two rules of the default pack ran
one for every exec (`has(proc.ssh) && ...`) and every accept (`net.what == "listen" && ...`)
although the record's own fields settle the answer. For a condition `ATOM && REST` (no
top-level `||` or `?:`, so it is false whenever ATOM is) where ATOM is `has(a.b)`,
`a.b == "lit"` or `a.b != "lit"`, `gate(source)` returns a function of the record that says
False when ATOM is false on this record, True when the whole condition is ATOM and it holds,
and None (ask CEL) otherwise, including whenever a field is missing or not a string, so CEL's
own answer and its error count stay what they were.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

_PATH = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_HAS = re.compile(rf"has\(\s*({_PATH}\.[A-Za-z_]\w*)\s*\)")
_CMP = re.compile(rf"({_PATH})\s*(==|!=)\s*(?:\"([^\"\\]*)\"|'([^'\\]*)')")


def _split(src: str) -> Optional[tuple[str, bool]]:
    """(first top-level conjunct, whether more follows); None when the expression has a
    top-level `||` or `?` (then a false first conjunct does not make it false)."""
    depth, i, n, cut = 0, 0, len(src), -1
    quote = ""
    while i < n:
        c = src[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if src.startswith(quote, i):
                i += len(quote)
                quote = ""
                continue
            i += 1
            continue
        if c in "\"'":
            quote = src[i:i + 3] if src[i:i + 3] in ('"""', "'''") else c
            i += len(quote)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            if src.startswith("||", i) or c == "?":
                return None
            if src.startswith("&&", i) and cut < 0:
                cut = i
        i += 1
    if cut < 0:
        return src.strip(), False
    return src[:cut].strip(), True


def _get(rec: dict, parts: list[str]):
    cur = rec
    for p in parts:
        if not isinstance(cur, dict) or p not in cur:
            return _MISSING
        cur = cur[p]
    return cur


_MISSING = object()


def gate(source: str) -> Optional[Callable[[dict], Optional[bool]]]:
    split = _split(source)
    if split is None:
        return None
    atom, more = split
    m = _HAS.fullmatch(atom)
    if m:
        *parent, last = m.group(1).split(".")
        if parent[0] == "lists":
            return None

        def has(rec: dict) -> Optional[bool]:
            d = _get(rec, parent)
            if not isinstance(d, dict):
                return None
            if last not in d:
                return False
            return None if more else True
        return has
    m = _CMP.fullmatch(atom)
    if m:
        parts = m.group(1).split(".")
        if parts[0] == "lists":
            return None
        eq = m.group(2) == "=="
        lit = m.group(3) if m.group(3) is not None else m.group(4)

        def cmp(rec: dict) -> Optional[bool]:
            v = _get(rec, parts)
            if not isinstance(v, str):
                return None
            if (v == lit) != eq:
                return False
            return None if more else True
        return cmp
    return None


def has_field(source: str) -> Optional[tuple[str, ...]]:
    """The path `p` when the condition's first conjunct is `has(p)` and so the condition is
    false on every record where p's parent is a map without p's last key (what `gate` decides
    without CEL); None otherwise. The engine drops such a rule from the candidates of a record
    lacking the key instead of asking the gate each time."""
    split = _split(source)
    if split is None:
        return None
    m = _HAS.fullmatch(split[0])
    if not m:
        return None
    parts = tuple(m.group(1).split("."))
    return None if parts[0] == "lists" else parts


def eq_field(source: str) -> Optional[tuple[tuple[str, ...], str]]:
    """(path, literal) when the condition's first conjunct is `path == "literal"`, so the
    condition is false on every record where path holds a string other than the literal (what
    `gate` decides without CEL); None otherwise. The engine drops such a rule from the
    candidates of those records (match/eqindex.py) instead of asking the gate each time."""
    split = _split(source)
    if split is None:
        return None
    m = _CMP.fullmatch(split[0])
    if not m or m.group(2) != "==":
        return None
    parts = tuple(m.group(1).split("."))
    if parts[0] == "lists":
        return None
    return parts, (m.group(3) if m.group(3) is not None else m.group(4))
