# Augmenting declarations for the compiled build of decodecache.py (scripts/build_native.py):
# C fields instead of slot lookups, dict calls without method lookups. Public: tests read the
# bound (len(dc._argv)).
cdef class DecodeCache:
    cdef public dict _argv
    cdef public dict _text
    cpdef list argv(self, object raw)
    cpdef str text(self, object raw)
