# cython: language_level=3
"""Batch normalisation over the batch axis, as torch.nn.BatchNorm1d.

Training (per feature j, batch of N):
  mean_j = sum_i x_ij / N
  var_j  = sum_i (x_ij - mean_j)^2 / N          biased: used to normalise
  xhat   = (x - mean) / sqrt(var + eps)
  y      = gamma * xhat + beta
  running = (1 - momentum) * running + momentum * stat, with the *unbiased*
            variance var * N / (N - 1) for running_var
Eval: the same with running_mean / running_var.

Backward (the full derivative, through the batch mean and variance too;
docs/derivations.md):
  dbeta  = sum_i dy
  dgamma = sum_i dy * xhat
  dx     = gamma / (N * sqrt(var + eps)) * (N * dy - dbeta - xhat * dgamma)

Statistics and sums are accumulated in float64 whatever the layer's dtype:
float32 sums lose ~1e-3 on inputs like N(1000, 0.1). One pass over the input
accumulates deviations from a per-feature shift (the first row), so the
variance does not cancel the way E[x^2] - E[x]^2 would. Per-feature constants
are folded once per call (scale forward; a/b/c backward) into arrays of
the layer's dtype, so the element-wise passes are plain vectorisable loops.
Nothing is allocated per call once the batch size is known.
"""

import numpy as np
cimport numpy as cnp
from libc.math cimport sqrt

from cython cimport floating

from nnrt.layer cimport Layer, NNRT_ABI_VERSION, _unaliased, reuse_buffer

from nnrt.layer import check_abi

cnp.import_array()
check_abi(NNRT_ABI_VERSION, __name__)


cdef void bn_batch_stats(const floating* X, Py_ssize_t n, Py_ssize_t f,
                         double* mean, double* var) noexcept nogil:
    # One pass, float64 accumulators of the deviations from a per-feature shift
    # K_j (the first row): mean = K + S1/n, var = S2/n - (S1/n)^2. With the shift,
    # S1/n is of the order of the spread, so the subtraction does not cancel even
    # for inputs like N(1000, 0.1). Inner loop over features: vectorises.
    cdef Py_ssize_t i, j
    cdef const floating* row
    cdef double d
    for j in range(f):
        mean[j] = 0
        var[j] = 0
    for i in range(1, n):
        row = &X[i * f]
        for j in range(f):
            d = <double>row[j] - <double>X[j]
            mean[j] += d
            var[j] += d * d
    for j in range(f):
        d = mean[j] / n
        var[j] = var[j] / n - d * d
        if var[j] < 0:
            var[j] = 0
        mean[j] = X[j] + d


cdef void bn_affine(const floating* X, floating* Y, Py_ssize_t n, Py_ssize_t f,
                    const floating* center, const floating* scale,
                    const floating* shift) noexcept nogil:
    # y = (x - center) * scale + shift, with center = mean, scale = gamma / sqrt(var + eps)
    # and shift = beta (plus the rounding correction of center), per feature.
    # NOTE: centring first keeps float32 accurate for inputs far from 0
    # (x * scale - mean * scale would cancel).
    cdef Py_ssize_t i, j
    cdef const floating* xr
    cdef floating* yr
    for i in range(n):
        xr = &X[i * f]
        yr = &Y[i * f]
        for j in range(f):
            yr[j] = (xr[j] - center[j]) * scale[j] + shift[j]


cdef void bn_backward_sums(const floating* X, const floating* dY, const floating* mean,
                           double* sum_dy, double* sum_dyxc,
                           Py_ssize_t n, Py_ssize_t f) noexcept nogil:
    # sum_dy = sum_i dy,  sum_dyxc = sum_i dy * (x - mean)   (float64 accumulators)
    cdef Py_ssize_t i, j
    cdef const floating* xr
    cdef const floating* gr
    for j in range(f):
        sum_dy[j] = 0
        sum_dyxc[j] = 0
    for i in range(n):
        xr = &X[i * f]
        gr = &dY[i * f]
        for j in range(f):
            sum_dy[j] += gr[j]
            sum_dyxc[j] += <double>gr[j] * <double>(xr[j] - mean[j])


cdef void bn_backward_dx(const floating* X, const floating* dY, floating* dX,
                         const floating* mean, const floating* a, const floating* b,
                         const floating* c, Py_ssize_t n, Py_ssize_t f) noexcept nogil:
    # dx = gamma*invstd * (dy - mean(dy) - xhat * mean(dy*xhat)), folded per feature
    # into dx = a * dy + c * (x - mean) + b
    cdef Py_ssize_t i, j
    cdef const floating* xr
    cdef const floating* gr
    cdef floating* dxr
    for i in range(n):
        xr = &X[i * f]
        gr = &dY[i * f]
        dxr = &dX[i * f]
        for j in range(f):
            dxr[j] = a[j] * gr[j] + c[j] * (xr[j] - mean[j]) + b[j]


cdef inline double _get(cnp.ndarray arr, Py_ssize_t j, bint f32) noexcept:
    if f32:
        return (<float*>cnp.PyArray_DATA(arr))[j]
    return (<double*>cnp.PyArray_DATA(arr))[j]


cdef inline void _put(cnp.ndarray arr, Py_ssize_t j, double v, bint f32) noexcept:
    if f32:
        (<float*>cnp.PyArray_DATA(arr))[j] = <float>v
    else:
        (<double*>cnp.PyArray_DATA(arr))[j] = v


cdef class BatchNorm(Layer):
    """Batch normalisation of (batch, num_features) inputs (registry name ``batchnorm``).

    Parameters ``gamma`` (ones) and ``beta`` (zeros); buffers ``running_mean``
    (zeros) and ``running_var`` (ones). Training normalises with the batch
    mean and biased variance and updates the running statistics with
    ``momentum`` (unbiased variance); eval uses the running statistics.
    A training batch of one sample raises ValueError (its variance is 0).
    """

    cdef readonly object num_features
    cdef readonly double momentum, eps
    cdef cnp.ndarray gamma, beta, dgamma, dbeta, running_mean, running_var
    # float64 per-feature scratch: mean, invstd of the last training batch;
    # scale/shift for the affine pass; two backward accumulators
    cdef cnp.ndarray _mean, _invstd, _var, _scale, _shift, _acc1, _acc2
    # the same in the layer's dtype: batch mean, affine scale, backward a/b/c
    cdef cnp.ndarray _mean_t, _scale_t, _shift_t, _a_t, _b_t, _c_t
    cdef object _X, _Y_train, _Y_eval, _dX

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        if (isinstance(num_features, (bool, np.bool_))
                or not isinstance(num_features, (int, np.integer)) or num_features <= 0):
            raise ValueError(
                f"BatchNorm: num_features must be a positive int, got {num_features!r}"
            )
        momentum = float(momentum)
        eps = float(eps)
        if not (0.0 <= momentum <= 1.0):
            raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {momentum!r}")
        if not (eps > 0.0):
            raise ValueError(f"BatchNorm: eps must be > 0, got {eps!r}")
        n = int(num_features)
        self.num_features = n
        self.in_features = n
        self.out_features = n
        self.momentum = momentum
        self.eps = eps
        self.dtype = np.float64
        self.gamma = np.ones(n)
        self.beta = np.zeros(n)
        self.dgamma = np.zeros(n)
        self.dbeta = np.zeros(n)
        self.running_mean = np.zeros(n)
        self.running_var = np.ones(n)
        self._mean = np.zeros(n)
        self._invstd = np.zeros(n)
        self._var = np.zeros(n)
        self._scale = np.zeros(n)
        self._shift = np.zeros(n)
        self._acc1 = np.zeros(n)
        self._acc2 = np.zeros(n)
        self._alloc_scratch()

    def _alloc_scratch(self):
        n = self.num_features
        dt = self._dtype
        self._mean_t = np.zeros(n, dtype=dt)
        self._scale_t = np.zeros(n, dtype=dt)
        self._shift_t = np.zeros(n, dtype=dt)
        self._a_t = np.zeros(n, dtype=dt)
        self._b_t = np.zeros(n, dtype=dt)
        self._c_t = np.zeros(n, dtype=dt)

    def reset_parameters(self, rng=None):
        """gamma = 1, beta = 0, running_mean = 0, running_var = 1 (no randomness)."""
        self.gamma[...] = 1
        self.beta[...] = 0
        self.running_mean[...] = 0
        self.running_var[...] = 1

    cpdef dict params(self):
        return {"gamma": self.gamma, "beta": self.beta}

    cpdef dict grads(self):
        return {"gamma": self.dgamma, "beta": self.dbeta}

    cpdef dict buffers(self):
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    cpdef dict config(self):
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps}

    cpdef object to_dtype(self, object dtype):
        self.dtype = dtype
        dt = self._dtype
        self.gamma = np.ascontiguousarray(self.gamma, dtype=dt)
        self.beta = np.ascontiguousarray(self.beta, dtype=dt)
        self.dgamma = np.ascontiguousarray(self.dgamma, dtype=dt)
        self.dbeta = np.ascontiguousarray(self.dbeta, dtype=dt)
        self.running_mean = np.ascontiguousarray(self.running_mean, dtype=dt)
        self.running_var = np.ascontiguousarray(self.running_var, dtype=dt)
        self._alloc_scratch()
        self._X = self._Y_train = self._Y_eval = self._dX = None
        return self

    cdef void _fold_train(self, Py_ssize_t n) noexcept:
        # per-feature constants of a training forward from the batch statistics,
        # and the running-statistics update (unbiased variance, as torch)
        cdef Py_ssize_t j, f = self.num_features
        cdef bint f32 = self._typenum == cnp.NPY_FLOAT32
        cdef double* mean = <double*>cnp.PyArray_DATA(self._mean)
        cdef double* var = <double*>cnp.PyArray_DATA(self._var)
        cdef double* invstd = <double*>cnp.PyArray_DATA(self._invstd)
        cdef double m = self.momentum, eps = self.eps, sc
        # NOTE: beta and running stats are read before being written: _put after _get
        cdef double unbias = <double>n / (n - 1)
        for j in range(f):
            invstd[j] = 1.0 / sqrt(var[j] + eps)
            sc = _get(self.gamma, j, f32) * invstd[j]
            _put(self._scale_t, j, sc, f32)
            _put(self._mean_t, j, mean[j], f32)
            # NOTE: the affine pass centres on mean_t (mean rounded to the dtype); the
            # rounding error moves into the shift: y = (x - mean_t) sc + beta + (mean_t - mean) sc
            _put(self._shift_t, j,
                 _get(self.beta, j, f32) + (_get(self._mean_t, j, f32) - mean[j]) * sc, f32)
            _put(self.running_mean, j, (1 - m) * _get(self.running_mean, j, f32) + m * mean[j],
                 f32)
            _put(self.running_var, j,
                 (1 - m) * _get(self.running_var, j, f32) + m * var[j] * unbias, f32)

    cdef void _fold_eval(self) noexcept:
        cdef Py_ssize_t j, f = self.num_features
        cdef bint f32 = self._typenum == cnp.NPY_FLOAT32
        cdef double eps = self.eps, sc
        for j in range(f):
            sc = _get(self.gamma, j, f32) / sqrt(_get(self.running_var, j, f32) + eps)
            _put(self._scale_t, j, sc, f32)

    cpdef object forward(self, object X, bint training=False):
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(Xa, 1)
        cdef cnp.ndarray Y, center, shift
        cdef double* mean = <double*>cnp.PyArray_DATA(self._mean)
        cdef double* var = <double*>cnp.PyArray_DATA(self._var)
        if training:
            if n < 2:
                raise ValueError(
                    f"{self!r}: training needs more than 1 sample per batch to compute "
                    f"a batch variance, got shape {(<object>Xa).shape} dtype {Xa.dtype}"
                )
            # the cached X must survive this forward: never write Y over it
            Y = reuse_buffer(_unaliased(self._Y_train, Xa), n, f, self._typenum)
            self._Y_train = Y
            self._X = Xa
            if self._typenum == cnp.NPY_FLOAT32:
                with nogil:
                    bn_batch_stats(<float*>cnp.PyArray_DATA(Xa), n, f, mean, var)
            else:
                with nogil:
                    bn_batch_stats(<double*>cnp.PyArray_DATA(Xa), n, f, mean, var)
            self._fold_train(n)
            center = self._mean_t
            shift = self._shift_t
        else:
            Y = reuse_buffer(_unaliased(self._Y_eval, Xa), n, f, self._typenum)
            self._Y_eval = Y
            self._fold_eval()
            center = self.running_mean
            shift = self.beta
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                bn_affine(<float*>cnp.PyArray_DATA(Xa), <float*>cnp.PyArray_DATA(Y), n, f,
                          <float*>cnp.PyArray_DATA(center), <float*>cnp.PyArray_DATA(self._scale_t),
                          <float*>cnp.PyArray_DATA(shift))
        else:
            with nogil:
                bn_affine(<double*>cnp.PyArray_DATA(Xa), <double*>cnp.PyArray_DATA(Y), n, f,
                          <double*>cnp.PyArray_DATA(center),
                          <double*>cnp.PyArray_DATA(self._scale_t),
                          <double*>cnp.PyArray_DATA(shift))
        return Y

    cdef void _fold_backward(self, Py_ssize_t n) noexcept:
        # dbeta = sum dy; dgamma = sum dy * xhat = invstd * sum dy (x - mean);
        # dx = a dy + c (x - mean) + b with a = gamma invstd, b = -a mean(dy),
        # c = -a invstd mean(dy xhat)
        cdef Py_ssize_t j, f = self.num_features
        cdef bint f32 = self._typenum == cnp.NPY_FLOAT32
        cdef double* invstd = <double*>cnp.PyArray_DATA(self._invstd)
        cdef double* s1 = <double*>cnp.PyArray_DATA(self._acc1)
        cdef double* s2 = <double*>cnp.PyArray_DATA(self._acc2)
        cdef double* mean = <double*>cnp.PyArray_DATA(self._mean)
        cdef double a, c, dm, dgamma
        for j in range(f):
            # NOTE: the sums pass centred x on mean_t (the dtype-rounded mean): correct
            # sum dy (x - mean) = sum dy (x - mean_t) + (mean_t - mean) sum dy
            dm = _get(self._mean_t, j, f32) - mean[j]
            dgamma = (s2[j] + dm * s1[j]) * invstd[j]
            _put(self.dbeta, j, s1[j], f32)
            _put(self.dgamma, j, dgamma, f32)
            a = _get(self.gamma, j, f32) * invstd[j]
            _put(self._a_t, j, a, f32)
            c = -a * invstd[j] * dgamma / n
            _put(self._c_t, j, c, f32)
            # dx = a dy + c (x - mean_t) + [b + c (mean_t - mean)]
            _put(self._b_t, j, -a * s1[j] / n + c * dm, f32)

    cpdef object backward(self, object dY):
        if self._X is None:
            raise self._no_forward_error()
        cdef cnp.ndarray X = <cnp.ndarray>self._X
        cdef cnp.ndarray dYa = self.prepare_grad(dY, <cnp.ndarray>self._Y_train)
        cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(X, 1)
        cdef cnp.ndarray dX = reuse_buffer(self._dX, n, f, self._typenum)
        self._dX = dX
        cdef double* a1 = <double*>cnp.PyArray_DATA(self._acc1)
        cdef double* a2 = <double*>cnp.PyArray_DATA(self._acc2)
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                bn_backward_sums(<float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(dYa),
                                 <float*>cnp.PyArray_DATA(self._mean_t), a1, a2, n, f)
        else:
            with nogil:
                bn_backward_sums(<double*>cnp.PyArray_DATA(X), <double*>cnp.PyArray_DATA(dYa),
                                 <double*>cnp.PyArray_DATA(self._mean_t), a1, a2, n, f)
        self._fold_backward(n)
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                bn_backward_dx(<float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(dYa),
                               <float*>cnp.PyArray_DATA(dX),
                               <float*>cnp.PyArray_DATA(self._mean_t),
                               <float*>cnp.PyArray_DATA(self._a_t),
                               <float*>cnp.PyArray_DATA(self._b_t),
                               <float*>cnp.PyArray_DATA(self._c_t), n, f)
        else:
            with nogil:
                bn_backward_dx(<double*>cnp.PyArray_DATA(X), <double*>cnp.PyArray_DATA(dYa),
                               <double*>cnp.PyArray_DATA(dX),
                               <double*>cnp.PyArray_DATA(self._mean_t),
                               <double*>cnp.PyArray_DATA(self._a_t),
                               <double*>cnp.PyArray_DATA(self._b_t),
                               <double*>cnp.PyArray_DATA(self._c_t), n, f)
        return dX
