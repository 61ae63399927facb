# cython: language_level=3
"""``relu`` and ``leaky_relu`` as a compiled third-party nnrt plugin.

The classes subclass nnrt's ``cdef class Layer`` (cimported from
``nnrt/layer.pxd``), so nnrt and other compiled code call them through the C
vtable, and the element loops run without the GIL.

  y  = x              if x > 0 else  slope * x
  dx = dy             if y > 0 else  slope * dy     (from the cached *output*:
                                                    for slope >= 0, y > 0 <=> x > 0)
"""

cimport numpy as cnp
from cython cimport floating

from nnrt.layer cimport Layer, NNRT_ABI_VERSION, reuse_buffer

from nnrt.layer import check_abi

cnp.import_array()
# NNRT_ABI_VERSION is the number in nnrt/layer.pxd when *this* module was
# compiled; check_abi compares it with the running nnrt and raises ImportError
# naming this module and both versions if they differ (the Layer struct
# layout would not match: calling into it could crash).
check_abi(NNRT_ABI_VERSION, __name__)


# Each element costs a compare, a select of the factor (1 or slope) and a
# multiply, with no branch: setup.py compiles with -fno-trapping-math, which
# lets GCC turn the select into a SIMD blend and vectorise the loop. Without
# it GCC keeps a real branch, mispredicted on half of random inputs (~100x
# slower on a (256, 1024) float32 batch).
cdef void leaky_forward(const floating* X, floating* Y, Py_ssize_t n,
                        floating slope) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating x, k
    for i in range(n):
        x = X[i]
        k = 1 if x > 0 else slope
        Y[i] = k * x


cdef void leaky_backward(const floating* Y, const floating* dY, floating* dX,
                         Py_ssize_t n, floating slope) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating k
    for i in range(n):
        k = 1 if Y[i] > 0 else slope
        dX[i] = k * dY[i]


cdef class LeakyReLU(Layer):
    """``max(x, 0) + negative_slope * min(x, 0)`` (registry name ``leaky_relu``).

    Keeps the width (``in_features``/``out_features`` are None). No parameters.
    ``negative_slope`` must be finite and >= 0.
    """

    cdef public double negative_slope
    # output buffers, reused while the shape and dtype stay the same; the
    # training one is also the cache that backward reads
    cdef object _Y_train, _Y_eval, _dX

    def __init__(self, negative_slope=0.01):
        slope = float(negative_slope)
        if not (0.0 <= slope < float("inf")):
            raise ValueError(
                f"{type(self).__name__}: negative_slope must be finite and >= 0, "
                f"got {negative_slope!r}"
            )
        self.negative_slope = slope
        self.in_features = None
        self.out_features = None

    cpdef dict config(self):
        return {"negative_slope": self.negative_slope}

    cpdef object to_dtype(self, object dtype):
        # no parameters to cast; drop buffers of the old dtype
        self.dtype = dtype
        self._Y_train = self._Y_eval = self._dX = None
        return self

    cpdef object forward(self, object X, bint training=False):
        # validation, casting and copies (if needed) all happen here, with the GIL
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef int t = cnp.PyArray_TYPE(Xa)
        cdef Py_ssize_t rows = cnp.PyArray_DIM(Xa, 0), cols = cnp.PyArray_DIM(Xa, 1)
        cdef cnp.ndarray Y
        if training:
            Y = reuse_buffer(self._Y_train, rows, cols, t)
            self._Y_train = Y
        else:
            Y = reuse_buffer(self._Y_eval, rows, cols, t)
            self._Y_eval = Y
        cdef Py_ssize_t n = rows * cols
        cdef double slope = self.negative_slope
        if t == cnp.NPY_FLOAT32:
            with nogil:
                leaky_forward(<const float*>cnp.PyArray_DATA(Xa),
                              <float*>cnp.PyArray_DATA(Y), n, <float>slope)
        else:
            with nogil:
                leaky_forward(<const double*>cnp.PyArray_DATA(Xa),
                              <double*>cnp.PyArray_DATA(Y), n, slope)
        return Y

    cpdef object backward(self, object dY):
        if self._Y_train is None:
            raise RuntimeError(
                f"{self!r}: backward() called before forward(X, training=True)"
            )
        cdef cnp.ndarray Y = <cnp.ndarray>self._Y_train
        cdef cnp.ndarray dYa = self.prepare_grad(dY, Y)
        cdef int t = cnp.PyArray_TYPE(Y)
        cdef Py_ssize_t rows = cnp.PyArray_DIM(Y, 0), cols = cnp.PyArray_DIM(Y, 1)
        cdef cnp.ndarray dX = reuse_buffer(self._dX, rows, cols, t)
        self._dX = dX
        cdef Py_ssize_t n = rows * cols
        cdef double slope = self.negative_slope
        if t == cnp.NPY_FLOAT32:
            with nogil:
                leaky_backward(<const float*>cnp.PyArray_DATA(Y),
                               <const float*>cnp.PyArray_DATA(dYa),
                               <float*>cnp.PyArray_DATA(dX), n, <float>slope)
        else:
            with nogil:
                leaky_backward(<const double*>cnp.PyArray_DATA(Y),
                               <const double*>cnp.PyArray_DATA(dYa),
                               <double*>cnp.PyArray_DATA(dX), n, slope)
        return dX


cdef class ReLU(LeakyReLU):
    """``max(x, 0)`` (registry name ``relu``): a LeakyReLU with slope 0."""

    def __init__(self):
        LeakyReLU.__init__(self, 0.0)

    cpdef dict config(self):
        return {}
