# cython: language_level=3
cimport numpy as cnp

from nnrt.layer cimport Layer


cdef class Dense(Layer):
    cdef public bint use_bias
    cdef cnp.ndarray W, b, dW, db
    # cached input of the last training forward; output buffers (training and
    # inference kept apart so an eval forward does not clobber what backward needs)
    cdef object _X
    cdef object _Y_train, _Y_eval, _dX

    cdef void _forward_kernel(self, cnp.ndarray X, cnp.ndarray Y) noexcept
    cdef void _backward_kernel(self, cnp.ndarray X, cnp.ndarray dY, cnp.ndarray dX) noexcept
