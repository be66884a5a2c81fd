# Augmenting declarations for the compiled build of ringbuf.py (scripts/build_native.py): the
# consume loop on C integers. The .py stays the pure fallback.
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
cimport cython

@cython.locals(buf=Py_buffer, base=cython.p_char, cons=cython.ulonglong, prod=cython.ulonglong,
               mask=cython.ulonglong, off=cython.ulonglong, ln=cython.uint, size=cython.uint,
               n=cython.longlong, lim=cython.longlong, deadline=cython.longlong, stop=cython.int,
               busy=cython.uint, discard=cython.uint, hdr_sz=cython.uint)
cdef object _consume_c(object r, object limit, object budget_ns)
