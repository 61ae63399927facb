# cython: language_level=3
"""C-level helpers of nnrt/_kernels.pyx shared with other compiled modules."""

cimport numpy as cnp
from cython cimport floating


# Rows of Y (n x c, row-major) whose predicted class is labels[i]: the argmax of the
# row (the first maximum; a NaN wins, as numpy's argmax), or Y[i, 0] > 0 for c == 1.
cdef Py_ssize_t count_correct(const floating* Y, const cnp.int64_t* labels,
                              Py_ssize_t n, Py_ssize_t c) noexcept nogil
