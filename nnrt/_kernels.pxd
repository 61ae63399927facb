# cython: language_level=3
"""C-level helpers of nnrt/_kernels.pyx shared with other compiled modules."""

cimport numpy as cnp
from cython cimport floating


# Rows of Y (n x c, row-major) whose predicted class is labels[i]: the argmax of the
# row (the first maximum; a NaN wins, as numpy's argmax), or Y[i, 0] > 0 for c == 1.
cdef Py_ssize_t count_correct(const floating* Y, const cnp.int64_t* labels,
                              Py_ssize_t n, Py_ssize_t c) noexcept nogil


# The training step's calls (nnrt/_engine.pyx calls them without a Python call each);
# documented in nnrt/_kernels.pyx.
cpdef object softmax_cross_entropy(object logits, object labels, bint count=*)
cpdef object sgd_step(list params, list grads, object bufs, double lr, double momentum,
                      double dampening, double weight_decay, bint nesterov, object fresh)
cpdef object same_items(list cached, object layers)
cpdef object params_held(list held)
cpdef object dtypes_are(object layers, object want)
cpdef object forward_chain(list layers, object X, bint training, object fuse=*,
                           bint trusted_input=*)
cpdef object backward_chain(list layers, object dY, Py_ssize_t stop, bint input_grad,
                            object fuse=*)
