# Augmenting declarations for the compiled build of decodecache.py (scripts/build_native.py):
# C fields instead of slot lookups, dict calls without method lookups.
cdef class DecodeCache:
    cdef dict _argv
    cdef dict _text
    cpdef list argv(self, object raw)
    cpdef str text(self, object raw)
