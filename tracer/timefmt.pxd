# Augmenting declarations for the compiled build of timefmt.py (scripts/build_native.py): every
# record's `ts`. A time outside the i64 range raises OverflowError on the way in, and
# format_ns formats it with Python ints instead.
cimport cython

@cython.locals(sec=cython.longlong, frac=cython.longlong, lsec=cython.longlong, last=tuple)
cdef str _format_c(long long t_ns)
