# cython: language_level=3
"""Compiled stages of a frozen inference session (nnrt/serve.py).

``FrozenDense``: ``Y = act(X @ W + b)`` on weights the stage owns. ``W`` and ``b``
are private copies made at construction (C-contiguous, read-only, never exposed to
Python: no attribute of the stage can be changed or replaced from Python), and
every size the kernel uses is a C field set once. Each call writes a new output
array, so a stage may run in several Python threads at once. On the CPUs where the
eval path uses its small-M kernel (AVX-512), the product runs on a copy of W packed
into column panels (nnrt/_packed.h; one row of a W of at most 512 KB on the
row-major W with the small-M kernel, nnrt/_smallm.h: the same sums), its panels
split over nnrt's helper thread when two threads are allowed; elsewhere on BLAS
GEMM. The bias and the sigmoid run panel by panel (or in one pass after the other
kernels), always through nnrt_pk_epilogue: a row gives the same bits in any batch.
"""

import numpy as np
cimport numpy as cnp

from cython cimport floating

from nnrt.blas cimport gemm_rm
from nnrt._parallel cimport blas_threads_done, blas_threads_for, par_now

cnp.import_array()

from nnrt._smallm cimport nnrt_smallm_d, nnrt_smallm_enabled, nnrt_smallm_f

from nnrt._parallel cimport PAR_STREAM, par_fn, par_for

cdef extern from "nnrt/_packed.h" nogil:
    Py_ssize_t nnrt_panels_f(Py_ssize_t n)
    Py_ssize_t nnrt_panels_d(Py_ssize_t n)
    Py_ssize_t nnrt_packed_size_f(Py_ssize_t k, Py_ssize_t n)
    Py_ssize_t nnrt_packed_size_d(Py_ssize_t k, Py_ssize_t n)
    void nnrt_pk_epilogue_f(float* Y, Py_ssize_t m, Py_ssize_t w, Py_ssize_t ldy,
                            const float* bias, int act)
    void nnrt_pk_epilogue_d(double* Y, Py_ssize_t m, Py_ssize_t w, Py_ssize_t ldy,
                            const double* bias, int act)
    void nnrt_pack_f(const float* W, float* Wp, Py_ssize_t k, Py_ssize_t n)
    void nnrt_pack_d(const double* W, double* Wp, Py_ssize_t k, Py_ssize_t n)
    void nnrt_packed_f(const float* X, const float* Wp, float* Y, Py_ssize_t m, Py_ssize_t k,
                       Py_ssize_t n, Py_ssize_t q0, Py_ssize_t q1, const float* bias, int act)
    void nnrt_packed_d(const double* X, const double* Wp, double* Y, Py_ssize_t m,
                       Py_ssize_t k, Py_ssize_t n, Py_ssize_t q0, Py_ssize_t q1,
                       const double* bias, int act)

# as nnrt/dense.pyx: the small-M kernel serves layers at least 32 wide and a multiple
# of 8 on CPUs where it beats GEMM; below _NOGIL_MIN multiply-adds the GIL is kept
cdef bint _SMALL_M_ON = nnrt_smallm_enabled() != 0
cdef Py_ssize_t _SMALL_M_MIN_COLS = 32
cdef Py_ssize_t _NOGIL_MIN = 32768
cdef Py_ssize_t _MAX_ELEMENTS = 2147483647
# The packed copy serves every batch of the layers the small-M kernel serves, but one
# row of a W of at most _PACKED_MIN_BYTES, which runs on the row-major W (the same
# sums). Measured on AMD Zen 5, one thread, float32, packed / small-M per layer: one
# row 784 x 512 14.6 / 15.1 us, 1024 x 1024 39.5 / 40.2 (W in L3), 256 x 640 3.2 / 4.7;
# 4 rows 784 x 512 15.5 / 22.7, 1024 x 1024 38.8 / 69.6; 64 rows 784 x 512 205 / 207,
# 1024 x 1024 532 / 588, 784 x 128 51.0 / 52.0, 64 x 64 2.56 / 2.83; but one row of a
# W in L2, 784 x 128 2.82 / 2.37 and 128 x 128 0.81 / 0.75 (the last panel of 32
# columns is one latency-bound chain of 2 vectors).
cdef Py_ssize_t _PACKED_MIN_BYTES = 524288
# Work of one panel for the two-thread split (par_for, "stream" kind: elements of W
# streamed at one row; from 9 rows on, the multiply-adds count in eighths)
cdef Py_ssize_t _SPLIT_ROWS = 8
# fewer panels than this split by rows from _SPLIT_ROWS_MIN rows (_run_packed)
cdef Py_ssize_t _SPLIT_PANELS_MIN = 4
cdef Py_ssize_t _SPLIT_ROWS_MIN = 32


ctypedef struct _PackedJob:
    const void* X
    const void* Wp
    void* Y
    const void* b
    Py_ssize_t m, k, n
    int act


cdef void _packed_job_f(void* ctx, Py_ssize_t q0, Py_ssize_t q1) noexcept nogil:
    cdef _PackedJob* j = <_PackedJob*>ctx
    nnrt_packed_f(<const float*>j.X, <const float*>j.Wp, <float*>j.Y, j.m, j.k, j.n, q0, q1,
                  <const float*>j.b, j.act)


cdef void _packed_job_d(void* ctx, Py_ssize_t q0, Py_ssize_t q1) noexcept nogil:
    cdef _PackedJob* j = <_PackedJob*>ctx
    nnrt_packed_d(<const double*>j.X, <const double*>j.Wp, <double*>j.Y, j.m, j.k, j.n, q0,
                  q1, <const double*>j.b, j.act)


cdef void _packed_rows_f(void* ctx, Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    # blocks b0 .. b1-1 of _SPLIT_ROWS rows, every panel
    cdef _PackedJob* j = <_PackedJob*>ctx
    cdef Py_ssize_t r0 = b0 * _SPLIT_ROWS, r1 = min(b1 * _SPLIT_ROWS, j.m)
    nnrt_packed_f(<const float*>j.X + r0 * j.k, <const float*>j.Wp, <float*>j.Y + r0 * j.n,
                  r1 - r0, j.k, j.n, 0, nnrt_panels_f(j.n), <const float*>j.b, j.act)


cdef void _packed_rows_d(void* ctx, Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    cdef _PackedJob* j = <_PackedJob*>ctx
    cdef Py_ssize_t r0 = b0 * _SPLIT_ROWS, r1 = min(b1 * _SPLIT_ROWS, j.m)
    nnrt_packed_d(<const double*>j.X + r0 * j.k, <const double*>j.Wp,
                  <double*>j.Y + r0 * j.n, r1 - r0, j.k, j.n, 0, nnrt_panels_d(j.n),
                  <const double*>j.b, j.act)


cdef void _run_packed(_PackedJob* job, bint dbl) noexcept nogil:
    # panels split over nnrt's helper thread when the policy allows two threads and the
    # layer is large enough (every panel computed by the same code: the same bits); a
    # layer of fewer than _SPLIT_PANELS_MIN panels (128 columns: one of 96 and one of
    # 32) splits into 3:1 or worse, so from _SPLIT_ROWS_MIN rows its rows are split
    # instead, in blocks of _SPLIT_ROWS (a row's result does not depend on the rows
    # that share its call; each thread reads all of W, which such a layer keeps in L2)
    cdef Py_ssize_t panels = nnrt_panels_d(job.n) if dbl else nnrt_panels_f(job.n)
    cdef Py_ssize_t blocks = (job.m + _SPLIT_ROWS - 1) // _SPLIT_ROWS
    if panels < _SPLIT_PANELS_MIN and job.m >= _SPLIT_ROWS_MIN:
        if dbl:
            par_for(PAR_STREAM, <par_fn>_packed_rows_d, job, blocks, job.k * job.n)
        else:
            par_for(PAR_STREAM, <par_fn>_packed_rows_f, job, blocks, job.k * job.n)
        return
    cdef Py_ssize_t cols = (job.n + panels - 1) // panels
    cdef Py_ssize_t unit = job.k * cols * blocks
    if dbl:
        par_for(PAR_STREAM, <par_fn>_packed_job_d, job, panels, unit)
    else:
        par_for(PAR_STREAM, <par_fn>_packed_job_f, job, panels, unit)


ACT_NONE = 0
ACT_SIGMOID = 1

# kernel of the stages built from now on: 0 by CPU (packed on the CPUs where the eval
# path uses the small-M kernel, GEMM elsewhere), 1 GEMM, 2 the small-M kernel on the
# row-major W, 3 packed (tests and benchmarks force them)
cdef int _mode = 0
KERNELS = {"auto": 0, "gemm": 1, "small": 2, "packed": 3}


def _set_kernel(str mode):
    """Kernel of FrozenDense stages built after this call: "auto", "gemm", "small" or
    "packed" (tests, benchmarks)."""
    global _mode
    if mode not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {mode!r}")
    _mode = KERNELS[mode]


# Packed copies of at least this many bytes live in whole 2 MB pages advised to be
# backed by transparent huge pages (Linux): a GEMV streaming 1024 x 1024 float32 from
# L3 took 40.4 instead of 42.9 us per layer on AMD Zen 5 (fewer TLB misses).
cdef Py_ssize_t _HUGE = 1 << 21


def _aligned_buffer(Py_ssize_t nbytes):
    """A uint8 array of ``nbytes``, 64-byte aligned (the packed kernel's vector loads);
    at 2 MB and more, on an anonymous mapping aligned to 2 MB with MADV_HUGEPAGE where
    the platform has it (the mapping stays alive as the array's base)."""
    if nbytes >= _HUGE:
        try:
            import mmap

            length = (nbytes + _HUGE - 1) // _HUGE * _HUGE
            mm = mmap.mmap(-1, length + _HUGE)
            addr = np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data
            off = (-addr) % _HUGE  # a multiple of the page size: the mapping is page-aligned
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    mm.madvise(mmap.MADV_HUGEPAGE, off, length)
                except OSError:
                    pass
            return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=off)
        except (OSError, ValueError, ImportError):
            pass
    buf = np.empty(nbytes + 64, dtype=np.uint8)
    cdef Py_ssize_t start = (-buf.ctypes.data) % 64
    return buf[start : start + nbytes]


cdef void _run_kernel(const floating* X, const floating* W, const floating* b, int act,
                      floating* Y, Py_ssize_t rows, Py_ssize_t n_in, Py_ssize_t n_out,
                      int kernel) noexcept nogil:
    # kernel: 1 GEMM, 2 small-M on the row-major W, 3 packed (W is then the packed copy)
    cdef _PackedJob job
    if kernel == 3:
        job.X = X
        job.Wp = W
        job.Y = Y
        job.b = b
        job.m = rows
        job.k = n_in
        job.n = n_out
        job.act = act
        _run_packed(&job, floating is double)
        return  # the epilogue ran panel by panel
    elif kernel == 2:
        if floating is float:
            nnrt_smallm_f(X, W, Y, rows, n_in, n_out, 0)
        else:
            nnrt_smallm_d(X, W, Y, rows, n_in, n_out, 0)
    else:
        gemm_rm(False, False, <int>rows, <int>n_out, <int>n_in, 1, X, <int>n_in, W,
                <int>n_out, 0, Y, <int>n_out)
    if b != NULL or act != 0:  # the packed kernel's epilogue: the same bits on every path
        if floating is float:
            nnrt_pk_epilogue_f(Y, rows, n_out, n_out, b, act)
        else:
            nnrt_pk_epilogue_d(Y, rows, n_out, n_out, b, act)


cdef class FrozenDense:
    """``act(X @ W + b)`` on private copies of ``W`` (n_in, n_out) and ``b`` (n_out,
    or None), float32 or float64; ``act`` 0 (none) or 1 (sigmoid). Internal: built by
    ``nnrt.serve.freeze``."""

    cdef cnp.ndarray _W
    cdef cnp.ndarray _Wp  # the packed copy (kernel 3), else None
    cdef cnp.ndarray _b
    cdef Py_ssize_t _n_in, _n_out
    cdef int _typenum, _act
    cdef int _kernel
    cdef bint _row_small  # kernel 3: one row runs on the row-major W (small-M kernel)
    cdef object _dtype

    def __init__(self, W, b, int act):
        W = np.array(W, order="C", copy=True)
        if W.ndim != 2 or W.dtype not in (np.float32, np.float64):
            raise ValueError(f"FrozenDense: W must be a 2-D float32/float64 array, got {W!r:.60}")
        if W.shape[0] < 1 or W.shape[1] < 1 or W.size > _MAX_ELEMENTS:
            raise ValueError(f"FrozenDense: bad weight shape {W.shape}")
        if act not in (0, 1):
            raise ValueError(f"FrozenDense: act must be 0 or 1, got {act}")
        if b is not None:
            b = np.array(b, dtype=W.dtype, order="C", copy=True)
            if b.shape != (W.shape[1],):
                raise ValueError(f"FrozenDense: bias of shape {b.shape}, expected ({W.shape[1]},)")
            b.setflags(write=False)
        W.setflags(write=False)
        self._W = W
        self._b = b
        self._n_in = W.shape[0]
        self._n_out = W.shape[1]
        self._typenum = cnp.PyArray_TYPE(W)
        self._dtype = W.dtype
        self._act = act
        cdef bint small = (_SMALL_M_ON and self._n_out >= _SMALL_M_MIN_COLS
                           and self._n_out % 8 == 0)
        # auto: packed on the CPUs where the eval path runs the small-M kernel, every
        # layer (narrow heads too: 512 x 10 at 1-64 rows 0.6-7.0 us against GEMM's
        # 1.4-9.6), with one row of a W in L2 on the row-major W where the small-M
        # kernel serves it (both compute the same sums: the same bits)
        self._kernel = _mode if _mode != 0 else (3 if _SMALL_M_ON else 1)
        self._row_small = _mode == 0 and small and W.nbytes <= _PACKED_MIN_BYTES
        cdef Py_ssize_t size
        cdef cnp.ndarray Wp
        if self._kernel == 3:
            size = (nnrt_packed_size_f(self._n_in, self._n_out)
                    if self._typenum == cnp.NPY_FLOAT32
                    else nnrt_packed_size_d(self._n_in, self._n_out))
            Wp = _aligned_buffer(size * W.itemsize).view(W.dtype)
            if self._typenum == cnp.NPY_FLOAT32:
                nnrt_pack_f(<float*>cnp.PyArray_DATA(W), <float*>cnp.PyArray_DATA(Wp),
                            self._n_in, self._n_out)
            else:
                nnrt_pack_d(<double*>cnp.PyArray_DATA(W), <double*>cnp.PyArray_DATA(Wp),
                            self._n_in, self._n_out)
            Wp.setflags(write=False)
            self._Wp = Wp

    @property
    def kernel(self):
        """The kernel this stage runs: "gemm", "small", "packed" or "packed+small" (the
        packed copy, but one row on the row-major W with the small-M kernel: the same
        sums)."""
        if self._kernel == 3 and self._row_small:
            return "packed+small"
        return {1: "gemm", 2: "small", 3: "packed"}[self._kernel]

    @property
    def in_features(self):
        return self._n_in

    @property
    def out_features(self):
        return self._n_out

    def arrays(self):
        """Copies of ``(W, b)`` (b None without a bias), for inspection and tests."""
        return self._W.copy(), (None if self._b is None else self._b.copy())

    def __reduce__(self):
        return (FrozenDense, (self._W, self._b, self._act))

    def __call__(self, X):
        return self.run(X)

    cpdef cnp.ndarray run(self, object X):
        """``act(X @ W + b)`` as a new array; ``X`` is cast to a C-contiguous 2-D array
        of the stage's dtype (its width must be in_features)."""
        cdef cnp.ndarray Xa
        if (type(X) is np.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>X) == self._typenum
                and cnp.PyArray_NDIM(<cnp.ndarray>X) == 2
                and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>X)
                and cnp.PyArray_ISALIGNED(<cnp.ndarray>X)
                and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>X)):
            Xa = <cnp.ndarray>X
        else:
            Xa = np.ascontiguousarray(np.asarray(X, dtype=self._dtype))
            if type(Xa) is not np.ndarray:
                Xa = np.array(Xa, dtype=self._dtype, order="C", subok=False)
        if cnp.PyArray_NDIM(Xa) != 2 or cnp.PyArray_DIM(Xa, 1) != self._n_in:
            raise ValueError(
                f"frozen dense stage: expected input of shape (batch, {self._n_in}), "
                f"got {np.shape(Xa)}"
            )
        cdef Py_ssize_t rows = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t n_in = self._n_in, n_out = self._n_out
        if rows < 1:
            raise ValueError("frozen dense stage: empty batch")
        if rows * n_out > _MAX_ELEMENTS or rows * n_in > _MAX_ELEMENTS:
            raise ValueError(f"frozen dense stage: batch of {rows} rows is too large")
        cdef cnp.npy_intp dims[2]
        dims[0] = rows
        dims[1] = n_out
        cdef cnp.ndarray Y = cnp.PyArray_EMPTY(2, dims, self._typenum, 0)
        cdef void* px = cnp.PyArray_DATA(Xa)
        cdef int kernel = self._kernel
        if kernel == 3 and rows == 1 and self._row_small:
            kernel = 2
        cdef void* pw = cnp.PyArray_DATA(self._Wp if kernel == 3 else self._W)
        cdef void* pb = NULL if self._b is None else cnp.PyArray_DATA(self._b)
        cdef void* py = cnp.PyArray_DATA(Y)
        cdef int act = self._act
        cdef bint big = rows * n_in * n_out >= _NOGIL_MIN
        # the GEMM's BLAS threads follow the thread policy (which learns from the time);
        # the packed kernel splits its panels itself (par_for)
        cdef int policy = blas_threads_for(rows, n_out, n_in, 0) if kernel == 1 else -1
        cdef double t0 = par_now() if kernel == 1 else 0.0
        if self._typenum == cnp.NPY_FLOAT32:
            if big:
                with nogil:
                    _run_kernel(<float*>px, <float*>pw, <float*>pb, act, <float*>py, rows,
                                n_in, n_out, kernel)
            else:
                _run_kernel(<float*>px, <float*>pw, <float*>pb, act, <float*>py, rows,
                            n_in, n_out, kernel)
        else:
            if big:
                with nogil:
                    _run_kernel(<double*>px, <double*>pw, <double*>pb, act, <double*>py,
                                rows, n_in, n_out, kernel)
            else:
                _run_kernel(<double*>px, <double*>pw, <double*>pb, act, <double*>py, rows,
                            n_in, n_out, kernel)
        if kernel == 1:
            blas_threads_done(policy, par_now() - t0)
        return Y


def run_stages(tuple stages, object X):
    """Run ``stages`` in order (FrozenDense through C, others through their call)."""
    cdef object out = X
    cdef object s
    for s in stages:
        if type(s) is FrozenDense:
            out = (<FrozenDense>s).run(out)
        else:
            out = s(out)
    return out
