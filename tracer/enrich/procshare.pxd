# C types for the compiled build of procshare.py (bench/profiles/htyped-enrich.md): `part` runs for
# every connect and accept record and reads the process table's entries as their C type. An
# instance __dict__ keeps `part` replaceable per instance (tests/test_procshare.py does).
cimport cython
from agenttrace.enrich.proctable cimport Proc, ProcTable


cdef class SharedProcs:
    cdef dict __dict__
    cdef public ProcTable procs
    cdef public dict _by_pid
    cdef public Py_ssize_t shared

    @cython.locals(procs=ProcTable, p=Proc, m=tuple, r=dict, d=dict, memo=tuple)
    cpdef dict part(self, object tgid, object uid, object comm, object build, object gpu_summary,
                    object ktime=*)
