# cython: language_level=3
cimport numpy as cnp

from nnrt.layer cimport Layer


cdef class Dense(Layer):
    # the widths the kernels use are Layer._n_in / _n_out (set once by _setup)
    cdef readonly bint use_bias
    cdef cnp.ndarray W, b, dW, db
    # cached input of the last training forward: a private copy of the caller's X,
    # or (trusted) the previous built-in layer's output buffer; _rows its batch size
    # (-1: no training forward since construction or to_dtype)
    cdef cnp.ndarray _X
    cdef Py_ssize_t _rows
    # output buffers (training and inference kept apart so an eval forward does not
    # clobber what backward needs); _Xcopy: storage for the private copy of X
    cdef object _Y_train, _Y_eval, _dX, _Xcopy

    cdef int _check_params(self, cnp.ndarray W, cnp.ndarray b, cnp.ndarray dW,
                           cnp.ndarray db) except -1
    cdef object _backward(self, object dY, bint input_grad)
