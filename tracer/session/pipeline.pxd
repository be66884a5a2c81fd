# C types for the compiled build only (scripts/build_native.py); pipeline.py stays the source
# and the pure fallback. _process and _flush (Tracer's, every record) with their dicts and lists
# typed: the tracer's own counters, batch and hooks, and an Event's record (a dict).
cimport cython

@cython.locals(rec=dict, counts=dict, hooks=list, batch=list)
cpdef _process(object self, object ev)

@cython.locals(batch=list, r=dict)
cpdef _flush(object self)

cpdef _on_view(object self, object view, object size)
