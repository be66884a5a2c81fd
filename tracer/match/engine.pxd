# C types for the compiled build only (scripts/build_native.py); engine.py stays the source and
# the pure fallback. _process is Engine.process (every record): its dicts, tuples and lists
# typed, so their lookups are C calls instead of method lookups (bench/profiles/htyped-match.md).
# Every value typed here is one the engine itself made (tuples of rules, its own dicts) or an
# Event's record (a dict); parts of a record an enricher shaped stay `object`.
cimport cython

@cython.locals(by_kind=dict, rules=tuple, all_rules=tuple, stats=dict, rec=dict, nc=tuple,
               by_scope=dict, cand=tuple, out=list, matchers=dict, named=bint, pd=dict,
               gate_cache=dict, port_ix=dict)
cpdef list _process(object self, object event)
