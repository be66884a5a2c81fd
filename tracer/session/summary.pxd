# C types for the compiled build only (scripts/build_native.py); summary.py stays the source
# and the pure fallback. observe() runs for every record the sinks get: its per-agent state
# is read through C fields here instead of slot descriptors, and its dicts without method
# lookups (bench/profiles/htyped-match.md).
cimport cython

cdef class _Pids:
    cdef public set _set
    cdef public bytearray _bits
    cdef public Py_ssize_t n
    cpdef add(self, pid)

cdef class _Agent:
    cdef public object ident, first, last, root, root_exit
    cdef public set seen_pids
    cdef public dict kinds, alerts, dests, names, connects, flows, gpu, gpu_open
    cdef public _Pids pids
    cdef public Py_ssize_t execs, forks, dests_other, names_other

cdef class Summaries:
    cdef public object node, top_n, waiting, quiet_forks
    cdef public dict _a

    @cython.locals(agent=dict, a=_Agent, kinds=dict, proc=dict, net=dict, dst=dict, rule=dict, by=dict)
    cpdef observe(self, dict rec)
    cpdef observe_batch(self, list records)
