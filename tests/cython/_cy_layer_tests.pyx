# cython: language_level=3
"""Compiled part of the test suite: cimports nnrt's .pxd files like a Cython plugin.

Each ``test_*`` function below is collected by ``tests/test_cython_suite.py``
and raises AssertionError on failure. They exercise what pure-Python tests
cannot reach: the ``nogil`` GEMM helper on raw pointers, the ``reuse_buffer``
C helper, and C-level (vtable) dispatch through a ``cdef Layer`` variable,
both into the core's ``Dense`` and into ``CyScale``, a Cython ``Layer``
subclass defined here exactly as a third-party compiled plugin would define
one. References are naive loops written in this file, accumulated in double.
"""

import numpy as np
cimport numpy as cnp
from libc.math cimport fabs

from cython cimport floating

from nnrt._blas cimport blas_get_threads, blas_set_threads
from nnrt.blas cimport gemm_rm, gemv_rm
from nnrt.dense cimport Dense
from nnrt.layer cimport Layer, NNRT_ABI_VERSION, reuse_buffer

import nnrt.layer as _nnrt_layer
from nnrt.layer import check_abi

cnp.import_array()
check_abi(NNRT_ABI_VERSION, __name__)


# ---------------------------------------------------------------- CyScale layer

cdef void scale_forward(const floating* X, const floating* s, floating* Y,
                        Py_ssize_t n, Py_ssize_t f) noexcept nogil:
    # y_ij = x_ij * s_j
    cdef Py_ssize_t i, j
    for i in range(n):
        for j in range(f):
            Y[i * f + j] = X[i * f + j] * s[j]


cdef void scale_backward(const floating* X, const floating* s, const floating* dY,
                         floating* dX, floating* ds, double* acc,
                         Py_ssize_t n, Py_ssize_t f) noexcept nogil:
    # dx_ij = dy_ij * s_j;  ds_j = sum_i dy_ij * x_ij (accumulated in double)
    cdef Py_ssize_t i, j
    for j in range(f):
        acc[j] = 0
    for i in range(n):
        for j in range(f):
            dX[i * f + j] = dY[i * f + j] * s[j]
            acc[j] += <double>dY[i * f + j] * X[i * f + j]
    for j in range(f):
        ds[j] = <floating>acc[j]


cdef class CyScale(Layer):
    """Per-feature scale ``y = x * scale`` (a Cython Layer subclass, test-only).

    Parameter ``scale`` of shape (num_features,), drawn uniform in [0.5, 1.5).
    """

    cdef readonly object num_features
    cdef cnp.ndarray scale, dscale, _acc
    cdef object _X, _Y_train, _Y_eval, _dX

    def __init__(self, num_features):
        if (isinstance(num_features, (bool, np.bool_))
                or not isinstance(num_features, (int, np.integer)) or num_features <= 0):
            raise ValueError(f"CyScale: num_features must be a positive int, got {num_features!r}")
        n = int(num_features)
        self.num_features = n
        self.in_features = n
        self.out_features = n
        self.dtype = np.float64
        self.scale = np.ones(n)
        self.dscale = np.zeros(n)
        self._acc = np.zeros(n)
        self.reset_parameters(np.random.default_rng(0))

    def reset_parameters(self, rng):
        self.scale[...] = rng.uniform(0.5, 1.5, size=self.num_features)

    cpdef dict params(self):
        return {"scale": self.scale}

    cpdef dict grads(self):
        return {"scale": self.dscale}

    cpdef dict config(self):
        return {"num_features": self.num_features}

    cpdef object to_dtype(self, object dtype):
        self.dtype = dtype
        self.scale = np.ascontiguousarray(self.scale, dtype=self._dtype)
        self.dscale = np.ascontiguousarray(self.dscale, dtype=self._dtype)
        self._X = self._Y_train = self._Y_eval = self._dX = None
        return self

    cpdef object forward(self, object X, bint training=False):
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(Xa, 1)
        cdef cnp.ndarray Y
        if training:
            Y = reuse_buffer(self._Y_train, n, f, self._typenum)
            self._Y_train = Y
            self._X = Xa
        else:
            Y = reuse_buffer(self._Y_eval, n, f, self._typenum)
            self._Y_eval = Y
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                scale_forward(<float*>cnp.PyArray_DATA(Xa), <float*>cnp.PyArray_DATA(self.scale),
                              <float*>cnp.PyArray_DATA(Y), n, f)
        else:
            with nogil:
                scale_forward(<double*>cnp.PyArray_DATA(Xa),
                              <double*>cnp.PyArray_DATA(self.scale),
                              <double*>cnp.PyArray_DATA(Y), n, f)
        return Y

    cpdef object backward(self, object dY):
        if self._X is None:
            raise self._no_forward_error()
        cdef cnp.ndarray X = <cnp.ndarray>self._X
        cdef cnp.ndarray dYa = self.prepare_grad(dY, <cnp.ndarray>self._Y_train)
        cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(X, 1)
        cdef cnp.ndarray dX = reuse_buffer(self._dX, n, f, self._typenum)
        self._dX = dX
        cdef double* acc = <double*>cnp.PyArray_DATA(self._acc)
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                scale_backward(<float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(self.scale),
                               <float*>cnp.PyArray_DATA(dYa), <float*>cnp.PyArray_DATA(dX),
                               <float*>cnp.PyArray_DATA(self.dscale), acc, n, f)
        else:
            with nogil:
                scale_backward(<double*>cnp.PyArray_DATA(X),
                               <double*>cnp.PyArray_DATA(self.scale),
                               <double*>cnp.PyArray_DATA(dYa), <double*>cnp.PyArray_DATA(dX),
                               <double*>cnp.PyArray_DATA(self.dscale), acc, n, f)
        return dX


# ------------------------------------------------------------------ helpers

cdef double _max_rel_err(cnp.ndarray got, cnp.ndarray want):
    # max |got - want| / (1 + |want|), both read as double
    cdef cnp.ndarray g = np.ascontiguousarray(got, dtype=np.float64)
    cdef cnp.ndarray w = np.ascontiguousarray(want, dtype=np.float64)
    assert (<object>g).shape == (<object>w).shape, (
        f"shape mismatch: got {(<object>g).shape}, want {(<object>w).shape}"
    )
    cdef const double* gp = <double*>cnp.PyArray_DATA(g)
    cdef const double* wp = <double*>cnp.PyArray_DATA(w)
    cdef Py_ssize_t i, size = cnp.PyArray_SIZE(g)
    cdef double worst = 0, e
    for i in range(size):
        e = fabs(gp[i] - wp[i]) / (1 + fabs(wp[i]))
        if e > worst or e != e:
            worst = e if e == e else float("inf")
    return worst


def _assert_close(got, want, double tol, what):
    err = _max_rel_err(np.asarray(got), np.asarray(want))
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.1e}"


cdef void naive_matmul(const double* A, const double* B, double* C,
                       Py_ssize_t m, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    # C (m x n) = A (m x k) @ B (k x n), all row-major and dense
    cdef Py_ssize_t i, j, p
    cdef double s
    for i in range(m):
        for j in range(n):
            s = 0
            for p in range(k):
                s += A[i * k + p] * B[p * n + j]
            C[i * n + j] = s


def _naive(A, B):
    A = np.ascontiguousarray(A, dtype=np.float64)
    B = np.ascontiguousarray(B, dtype=np.float64)
    cdef Py_ssize_t m = A.shape[0], k = A.shape[1], n = B.shape[1]
    assert B.shape[0] == k
    cdef cnp.ndarray C = np.empty((m, n), dtype=np.float64)
    cdef cnp.ndarray Aa = A, Ba = B
    with nogil:
        naive_matmul(<double*>cnp.PyArray_DATA(Aa), <double*>cnp.PyArray_DATA(Ba),
                     <double*>cnp.PyArray_DATA(C), m, n, k)
    return C


def _gemm_case(dtype, bint ta, bint tb, int m, int n, int k, int pad):
    """One gemm_rm call on padded row-major storage vs the naive loop."""
    rng = np.random.default_rng(1000 * ta + 100 * tb + m + n + k)
    # the logical operands op(A) (m x k) and op(B) (k x n)
    opA = rng.standard_normal((m, k))
    opB = rng.standard_normal((k, n))
    C0 = rng.standard_normal((m, n))
    stA = opA.T if ta else opA
    stB = opB.T if tb else opB
    # row-major storage with `pad` extra columns: exercises lda/ldb/ldc > width
    cdef cnp.ndarray A = np.full((stA.shape[0], stA.shape[1] + pad), np.nan, dtype=dtype)
    cdef cnp.ndarray B = np.full((stB.shape[0], stB.shape[1] + pad), np.nan, dtype=dtype)
    cdef cnp.ndarray C = np.full((m, n + pad), 7.0, dtype=dtype)
    A[:, : stA.shape[1]] = stA
    B[:, : stB.shape[1]] = stB
    C[:, :n] = C0
    cdef int lda = <int>A.shape[1], ldb = <int>B.shape[1], ldc = <int>C.shape[1]
    alpha, beta = 1.5, -0.5
    if dtype == np.float32:
        with nogil:
            gemm_rm(ta, tb, m, n, k, <float>alpha, <float*>cnp.PyArray_DATA(A), lda,
                    <float*>cnp.PyArray_DATA(B), ldb, <float>beta,
                    <float*>cnp.PyArray_DATA(C), ldc)
        tol = 1e-5
    else:
        with nogil:
            gemm_rm(ta, tb, m, n, k, <double>alpha, <double*>cnp.PyArray_DATA(A), lda,
                    <double*>cnp.PyArray_DATA(B), ldb, <double>beta,
                    <double*>cnp.PyArray_DATA(C), ldc)
        tol = 1e-12
    # reference from the values actually stored (rounded to float32 for float32)
    want = alpha * _naive(opA.astype(dtype), opB.astype(dtype))
    want += beta * C0.astype(dtype).astype(np.float64)
    what = (f"gemm_rm({np.dtype(dtype).name}, trans_a={bool(ta)}, trans_b={bool(tb)}, "
            f"m={m}, n={n}, k={k}, pad={pad})")
    _assert_close(C[:, :n], want, tol * max(k, 1), what)
    # the padding columns of C are outside the matrix: untouched
    assert np.all(C[:, n:] == 7.0), f"{what} wrote outside C's {n} columns"


def gemm_rm_call(bint ta, bint tb, int m, int n, int k, double alpha, A, B, double beta, C):
    """C[:, :n] = alpha op(A) op(B) + beta C through nnrt.blas.gemm_rm (float32/float64,
    row-major arrays whose row lengths are the leading dimensions)."""
    cdef cnp.ndarray a = A, b = B, c = C
    assert a.dtype == b.dtype == c.dtype and a.flags.c_contiguous and b.flags.c_contiguous
    assert c.flags.c_contiguous and c.flags.writeable
    assert a.shape[0] >= (k if ta else m) and a.shape[1] >= (m if ta else k)
    assert b.shape[0] >= (n if tb else k) and b.shape[1] >= (k if tb else n)
    assert c.shape[0] >= m and c.shape[1] >= n
    cdef int lda = <int>a.shape[1], ldb = <int>b.shape[1], ldc = <int>c.shape[1]
    if a.dtype == np.float32:
        with nogil:
            gemm_rm(ta, tb, m, n, k, <float>alpha, <float*>cnp.PyArray_DATA(a), lda,
                    <float*>cnp.PyArray_DATA(b), ldb, <float>beta, <float*>cnp.PyArray_DATA(c),
                    ldc)
    else:
        assert a.dtype == np.float64
        with nogil:
            gemm_rm(ta, tb, m, n, k, alpha, <double*>cnp.PyArray_DATA(a), lda,
                    <double*>cnp.PyArray_DATA(b), ldb, beta, <double*>cnp.PyArray_DATA(c), ldc)


def blas_threads_call(int n):
    """nnrt/_blas.pxd's C thread controls: set ``n`` (if > 0), return the count read back."""
    cdef int got
    with nogil:
        if n > 0:
            blas_set_threads(n)
        got = blas_get_threads()
    return got


def gemv_rm_call(bint trans, int m, int n, double alpha, A, x, double beta, y):
    """y = alpha op(A) x + beta y through nnrt.blas.gemv_rm; A (m x n, row length lda)."""
    cdef cnp.ndarray a = A, xa = x, ya = y
    assert a.dtype == xa.dtype == ya.dtype and a.flags.c_contiguous
    assert xa.flags.c_contiguous and ya.flags.c_contiguous and ya.flags.writeable
    assert a.shape[0] >= m and a.shape[1] >= n
    assert xa.shape[0] == (m if trans else n) and ya.shape[0] == (n if trans else m)
    cdef int lda = <int>a.shape[1]
    if a.dtype == np.float32:
        with nogil:
            gemv_rm(trans, m, n, <float>alpha, <float*>cnp.PyArray_DATA(a), lda,
                    <float*>cnp.PyArray_DATA(xa), <float>beta, <float*>cnp.PyArray_DATA(ya))
    else:
        assert a.dtype == np.float64
        with nogil:
            gemv_rm(trans, m, n, alpha, <double*>cnp.PyArray_DATA(a), lda,
                    <double*>cnp.PyArray_DATA(xa), beta, <double*>cnp.PyArray_DATA(ya))


# -------------------------------------------------------------------- tests

def test_abi_version_matches_core():
    assert NNRT_ABI_VERSION == _nnrt_layer.ABI_VERSION, (
        f"pxd ABI {NNRT_ABI_VERSION} != core ABI {_nnrt_layer.ABI_VERSION}"
    )
    assert check_abi(NNRT_ABI_VERSION, __name__) is True
    try:
        check_abi(NNRT_ABI_VERSION + 1, "cy_fake")
    except ImportError as exc:
        msg = str(exc)
        assert "cy_fake" in msg and str(NNRT_ABI_VERSION + 1) in msg, msg
    else:
        raise AssertionError("check_abi accepted a foreign ABI version")


def test_gemm_rm_float64_all_transposes():
    for ta in (False, True):
        for tb in (False, True):
            for (m, n, k) in ((1, 1, 1), (3, 5, 4), (7, 2, 9), (16, 13, 11)):
                for pad in (0, 3):
                    _gemm_case(np.float64, ta, tb, m, n, k, pad)


def test_gemm_rm_float32_all_transposes():
    for ta in (False, True):
        for tb in (False, True):
            for (m, n, k) in ((1, 1, 1), (3, 5, 4), (7, 2, 9), (16, 13, 11)):
                for pad in (0, 3):
                    _gemm_case(np.float32, ta, tb, m, n, k, pad)


def test_gemm_rm_beta_zero_ignores_nan_in_c():
    # BLAS with beta = 0 must not read C (the layers rely on it for fresh buffers)
    cdef int m = 4, n = 3, k = 5
    rng = np.random.default_rng(3)
    cdef cnp.ndarray A = rng.standard_normal((m, k))
    cdef cnp.ndarray B = rng.standard_normal((k, n))
    cdef cnp.ndarray C = np.full((m, n), np.nan)
    with nogil:
        gemm_rm(False, False, m, n, k, <double>1.0, <double*>cnp.PyArray_DATA(A), k,
                <double*>cnp.PyArray_DATA(B), n, <double>0.0, <double*>cnp.PyArray_DATA(C), n)
    _assert_close(C, _naive(A, B), 1e-12, "gemm_rm beta=0 over NaN-filled C")


def test_reuse_buffer_semantics():
    a = <object>reuse_buffer(None, 4, 3, cnp.NPY_FLOAT64)
    assert a.shape == (4, 3) and a.dtype == np.float64 and a.flags.c_contiguous
    # same shape and dtype: the very same object comes back (no allocation)
    b = <object>reuse_buffer(a, 4, 3, cnp.NPY_FLOAT64)
    assert b is a
    # other rows, other cols, other dtype: a fresh array, the old one untouched
    a[...] = 5.0
    c = <object>reuse_buffer(a, 5, 3, cnp.NPY_FLOAT64)
    assert c is not a and c.shape == (5, 3) and c.dtype == np.float64
    d = <object>reuse_buffer(a, 4, 2, cnp.NPY_FLOAT64)
    assert d is not a and d.shape == (4, 2)
    e = <object>reuse_buffer(a, 4, 3, cnp.NPY_FLOAT32)
    assert e is not a and e.dtype == np.float32 and e.shape == (4, 3)
    assert e.flags.c_contiguous and e.flags.writeable
    assert np.all(a == 5.0)
    # a 1-D array of the right size is not reused (rank must match)
    flat = np.zeros(12)
    f = <object>reuse_buffer(flat, 4, 3, cnp.NPY_FLOAT64)
    assert f is not flat and f.shape == (4, 3)
    # float32 buffer reused for float32
    assert reuse_buffer(e, 4, 3, cnp.NPY_FLOAT32) is e


cdef object _dense_reference(cnp.ndarray X, cnp.ndarray W, cnp.ndarray b, cnp.ndarray dY):
    """Naive float64 loops: Y = X W + b, dW = X^T dY, db = sum_i dY, dX = dY W^T."""
    cdef cnp.ndarray X64 = np.ascontiguousarray(X, dtype=np.float64)
    cdef cnp.ndarray W64 = np.ascontiguousarray(W, dtype=np.float64)
    cdef cnp.ndarray b64 = np.ascontiguousarray(b, dtype=np.float64)
    cdef cnp.ndarray dY64 = np.ascontiguousarray(dY, dtype=np.float64)
    cdef Py_ssize_t n = X64.shape[0], fi = X64.shape[1], fo = W64.shape[1]
    cdef cnp.ndarray Y = np.zeros((n, fo))
    cdef cnp.ndarray dW = np.zeros((fi, fo))
    cdef cnp.ndarray db = np.zeros(fo)
    cdef cnp.ndarray dX = np.zeros((n, fi))
    cdef double[:, ::1] x = X64, w = W64, dy = dY64, y = Y, dw = dW, dx = dX
    cdef double[::1] bb = b64, dbb = db
    cdef Py_ssize_t i, j, p
    with nogil:
        for i in range(n):
            for j in range(fo):
                y[i, j] = bb[j]
                for p in range(fi):
                    y[i, j] += x[i, p] * w[p, j]
        for p in range(fi):
            for j in range(fo):
                for i in range(n):
                    dw[p, j] += x[i, p] * dy[i, j]
        for i in range(n):
            for j in range(fo):
                dbb[j] += dy[i, j]
        for i in range(n):
            for p in range(fi):
                for j in range(fo):
                    dx[i, p] += dy[i, j] * w[p, j]
    return Y, dW, db, dX


def _check_dense_dispatch(dtype, double tol):
    cdef Layer layer = Dense(6, 4)     # typed as the base: calls go through the vtable
    layer.to_dtype(dtype)
    rng = np.random.default_rng(11)
    X = rng.standard_normal((9, 6)).astype(dtype)
    dY = rng.standard_normal((9, 4)).astype(dtype)
    Y = layer.forward(X, True)
    assert Y.dtype == np.dtype(dtype) and Y.shape == (9, 4)
    Y_copy = np.array(Y)
    dX = layer.backward(dY)
    assert dX.dtype == np.dtype(dtype) and dX.shape == (9, 6)
    p = layer.params()
    g = layer.grads()
    assert set(p) == {"weight", "bias"} and set(g) == {"weight", "bias"}
    Y_ref, dW_ref, db_ref, dX_ref = _dense_reference(X, p["weight"], p["bias"], dY)
    name = np.dtype(dtype).name
    _assert_close(Y_copy, Y_ref, tol, f"Dense.forward {name}")
    _assert_close(dX, dX_ref, tol, f"Dense.backward dX {name}")
    _assert_close(g["weight"], dW_ref, tol, f"Dense.backward dW {name}")
    _assert_close(g["bias"], db_ref, tol, f"Dense.backward db {name}")
    # eval forward through the vtable matches and leaves backward's cache alone
    Y_eval = layer.forward(X, False)
    _assert_close(Y_eval, Y_ref, tol, f"Dense eval forward {name}")
    dX2 = layer.backward(dY)
    _assert_close(dX2, dX_ref, tol, f"Dense.backward after eval forward {name}")


def test_dense_c_dispatch_float64():
    _check_dense_dispatch(np.float64, 1e-12)


def test_dense_c_dispatch_float32():
    _check_dense_dispatch(np.float32, 1e-5)


def test_dense_overwrites_grads():
    cdef Dense layer = Dense(3, 2)    # typed as Dense itself
    rng = np.random.default_rng(5)
    X = rng.standard_normal((4, 3))
    dY = rng.standard_normal((4, 2))
    layer.forward(X, True)
    layer.backward(dY)
    first = {k: v.copy() for k, v in layer.grads().items()}
    layer.forward(X, True)
    layer.backward(dY)
    for k, v in layer.grads().items():
        _assert_close(v, first[k], 1e-13, f"Dense grad {k} after a second backward")


cdef object _scale_reference(X, s, dY):
    X64 = np.asarray(X, dtype=np.float64)
    s64 = np.asarray(s, dtype=np.float64)
    dY64 = np.asarray(dY, dtype=np.float64)
    cdef Py_ssize_t n = X64.shape[0], f = X64.shape[1], i, j
    Y = np.empty((n, f))
    dX = np.empty((n, f))
    ds = np.zeros(f)
    for i in range(n):
        for j in range(f):
            Y[i, j] = X64[i, j] * s64[j]
            dX[i, j] = dY64[i, j] * s64[j]
            ds[j] += dY64[i, j] * X64[i, j]
    return Y, dX, ds


def _check_cyscale_dispatch(dtype, double tol):
    cdef Layer layer = CyScale(5)
    layer.to_dtype(dtype)
    assert layer.dtype == np.dtype(dtype)
    rng = np.random.default_rng(21)
    X = rng.standard_normal((7, 5)).astype(dtype)
    dY = rng.standard_normal((7, 5)).astype(dtype)
    Y = np.array(layer.forward(X, True))
    dX = layer.backward(dY)
    s = layer.params()["scale"]
    assert s.dtype == np.dtype(dtype) and s.shape == (5,)
    Y_ref, dX_ref, ds_ref = _scale_reference(X, s, dY)
    name = np.dtype(dtype).name
    _assert_close(Y, Y_ref, tol, f"CyScale.forward {name}")
    _assert_close(dX, dX_ref, tol, f"CyScale.backward dX {name}")
    _assert_close(layer.grads()["scale"], ds_ref, tol, f"CyScale.backward dscale {name}")
    assert Y.dtype == np.dtype(dtype) and dX.dtype == np.dtype(dtype)


def test_cyscale_c_dispatch_float64():
    _check_cyscale_dispatch(np.float64, 1e-13)


def test_cyscale_c_dispatch_float32():
    _check_cyscale_dispatch(np.float32, 1e-6)


def test_cyscale_members():
    cdef Layer layer = CyScale(3)
    assert layer.in_features == 3 and layer.out_features == 3
    assert layer.config() == {"num_features": 3}
    rebuilt = type(layer)(**layer.config())
    assert np.array_equal(rebuilt.params()["scale"], layer.params()["scale"])
    assert set(layer.params()) == set(layer.grads()) == {"scale"}
    assert layer.buffers() == {}
    try:
        CyScale(3).backward(np.zeros((2, 3)))
    except RuntimeError as exc:
        assert "forward" in str(exc), str(exc)
    else:
        raise AssertionError("backward before forward did not raise")
    try:
        layer.forward(np.zeros((2, 4)), True)
    except ValueError as exc:
        assert "CyScale" in str(exc) and "(2, 4)" in str(exc), str(exc)
    else:
        raise AssertionError("a wrong feature count did not raise")


class _PyDouble(Layer):
    """A Python subclass: the cpdef methods must dispatch to these overrides."""

    def __init__(self):
        super().__init__()
        self.in_features = None
        self.out_features = None

    def forward(self, X, training=False):
        return np.asarray(X) * 2.0

    def backward(self, dY):
        return np.asarray(dY) * 2.0


def test_cdef_layer_dispatches_to_python_override():
    cdef Layer layer = _PyDouble()
    X = np.arange(6.0).reshape(2, 3)
    _assert_close(layer.forward(X, True), X * 2.0, 0.0, "Python forward via cdef Layer")
    _assert_close(layer.backward(X), X * 2.0, 0.0, "Python backward via cdef Layer")


def test_chain_through_layer_array():
    # a tiny network driven entirely at C level: Dense -> CyScale -> Dense
    cdef list layers = [Dense(4, 6), CyScale(6), Dense(6, 3)]
    cdef Layer lay
    rng = np.random.default_rng(8)
    X = rng.standard_normal((5, 4))
    dY = rng.standard_normal((5, 3))
    out = X
    for lay in layers:
        out = lay.forward(out, True)
    Y = np.array(out)
    grad = dY
    for lay in reversed(layers):
        grad = lay.backward(grad)
    d0, s1, d2 = layers
    W0, b0 = d0.params()["weight"], d0.params()["bias"]
    s = s1.params()["scale"]
    W2, b2 = d2.params()["weight"], d2.params()["bias"]
    H = _naive(X, W0) + b0
    G = H * s
    Y_ref = _naive(G, W2) + b2
    _assert_close(Y, Y_ref, 1e-12, "Dense->CyScale->Dense forward")
    dG = _naive(dY, np.ascontiguousarray(W2.T))
    dH = dG * s
    dX_ref = _naive(dH, np.ascontiguousarray(W0.T))
    _assert_close(grad, dX_ref, 1e-12, "Dense->CyScale->Dense dX")
    _assert_close(s1.grads()["scale"], (dG * H).sum(axis=0), 1e-12, "CyScale dscale in chain")
    _assert_close(d0.grads()["weight"], _naive(np.ascontiguousarray(X.T), dH), 1e-12,
                  "first Dense dW in chain")
