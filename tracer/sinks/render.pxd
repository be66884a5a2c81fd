# C types for the compiled build only (scripts/build_native.py); render.py stays the source and
# the pure fallback. The records of a batch are dicts (a record is a JSON object); their parts
# stay `object` (an enricher shapes them).
cimport cython

@cython.locals(out=list, n=Py_ssize_t, i=Py_ssize_t, r=dict, nr=dict)
cpdef list render_lines(object records, object default, object option)
