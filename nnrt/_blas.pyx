# cython: language_level=3
"""The BLAS backend of nnrt's GEMM/GEMV helpers (nnrt/blas.pxd), chosen once per process.

Backends (docs/performance.md, "BLAS backends"):

* ``openblas``: numpy's bundled OpenBLAS (ILP64, symbols ``scipy_sgemm_64_`` ...),
  found by :func:`find_numpy_openblas`; the default.
* ``mkl``: Intel MKL's single dynamic library ``libmkl_rt`` from the optional ``mkl``
  wheel (``pip install nnrt[mkl]``), found by :func:`find_mkl`; ILP64 ``sgemm_64``
  ... (LP64 ``sgemm_`` if those are missing).
* ``scipy-openblas``: the ``scipy-openblas64`` wheel's OpenBLAS, when installed
  (an opt-in for comparisons; never chosen automatically).
* ``scipy``: ``scipy.linalg.cython_blas`` (scipy's OpenBLAS). Always present: the
  fallback, and what every pointer holds before any other backend is loaded.

Selection, at import: ``NNRT_BLAS=openblas|mkl|scipy-openblas|scipy`` forces one (an
unknown name, or a backend that cannot be loaded, warns and falls back to the
default). Otherwise ``openblas`` (``scipy`` if numpy's OpenBLAS is not found); and when
MKL is installed, the first GEMM (or ``info()``/``resolve()``/``set_threads``) runs a
short calibration (a few float32 GEMMs of nnrt's shapes at one thread on each, timed
in thread CPU time; 0.1-0.2 s) and uses MKL only if it takes at most 0.90x the time
of numpy's OpenBLAS. ``import nnrt`` never loads MKL; it costs a glob, a file check
and a dlopen of the OpenBLAS numpy already loaded.

nnrt's own GEMM kernel (nnrt/_smallm.h, register-blocked, W read in place, AVX-512/AVX2
builds picked at run time) is a route in front of the backend: a GEMM with alpha 1,
beta 0 or 1, an output a multiple of 8 and at least 32 wide, not TT, runs there instead
when its route (NN forward, TN weight gradient, NT input gradient) is on; with two
threads its rows are split over nnrt's helper thread (bit-identical to one thread).
``NNRT_GEMM_KERNEL=auto`` (default) times the kernel against the backend per route at
the first GEMM (float32, one thread; about 0.2 s; AVX2/AVX-512 CPUs only) and turns on
the float32 routes where it takes at most 0.95x the time; ``on`` turns every route on
(float32 and float64), ``off`` none.

C callers use ``sgemm_rm`` ... (nnrt/_blas.pxd, via nnrt/blas.pxd): one indirect call
through the current backend's table; the tables are filled once, before they can be
selected, and never change, so a switch (``use``) while another thread is inside a
GEMM is safe. No pointer is ever NULL: the scipy table is filled at module init.
"""

import os
import sys
import threading

import numpy as np

cimport numpy as cnp
from cython cimport floating
from libc.stdint cimport int64_t, uintptr_t
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv

from nnrt._smallm cimport (nnrt_aligned_alloc, nnrt_aligned_free, nnrt_aligned_ld,
                           nnrt_bgpf_clear, nnrt_bgpf_left, nnrt_bgpf_set, nnrt_gemm_s_d,
                           nnrt_gemm_s_f, nnrt_smallm_d, nnrt_smallm_f, nnrt_smallm_isa_name,
                           nnrt_transpose_d, nnrt_transpose_f)

__all__ = ["BACKENDS", "KERNEL_MODES", "available", "find_mkl", "find_numpy_openblas", "info",
           "resolve", "set_threads", "thread_control_addresses", "threads", "use",
           "use_kernel"]

ctypedef void (*sgemm32_t)(const char*, const char*, const int*, const int*, const int*,
                           const float*, const float*, const int*, const float*, const int*,
                           const float*, float*, const int*) noexcept nogil
ctypedef void (*dgemm32_t)(const char*, const char*, const int*, const int*, const int*,
                           const double*, const double*, const int*, const double*,
                           const int*, const double*, double*, const int*) noexcept nogil
ctypedef void (*sgemm64_t)(const char*, const char*, const int64_t*, const int64_t*,
                           const int64_t*, const float*, const float*, const int64_t*,
                           const float*, const int64_t*, const float*, float*,
                           const int64_t*) noexcept nogil
ctypedef void (*dgemm64_t)(const char*, const char*, const int64_t*, const int64_t*,
                           const int64_t*, const double*, const double*, const int64_t*,
                           const double*, const int64_t*, const double*, double*,
                           const int64_t*) noexcept nogil
ctypedef void (*sgemv32_t)(const char*, const int*, const int*, const float*, const float*,
                           const int*, const float*, const int*, const float*, float*,
                           const int*) noexcept nogil
ctypedef void (*dgemv32_t)(const char*, const int*, const int*, const double*, const double*,
                           const int*, const double*, const int*, const double*, double*,
                           const int*) noexcept nogil
ctypedef void (*sgemv64_t)(const char*, const int64_t*, const int64_t*, const float*,
                           const float*, const int64_t*, const float*, const int64_t*,
                           const float*, float*, const int64_t*) noexcept nogil
ctypedef void (*dgemv64_t)(const char*, const int64_t*, const int64_t*, const double*,
                           const double*, const int64_t*, const double*, const int64_t*,
                           const double*, double*, const int64_t*) noexcept nogil


ctypedef void (*set_threads_t)(int) noexcept nogil
ctypedef int (*get_threads_t)() noexcept nogil


cdef struct Table:
    # Fortran BLAS entry points of one backend; ilp64: 64-bit integer arguments
    int ilp64
    void* sgemm
    void* dgemm
    void* sgemv
    void* dgemv
    # C thread controls, void(int) and int(void), or NULL (then threadpoolctl's)
    void* set_threads
    void* get_threads


BACKENDS = ("openblas", "mkl", "scipy-openblas", "scipy")
_SLOT = {"scipy": 0, "openblas": 1, "mkl": 2, "scipy-openblas": 3}

# one table per backend, filled at most once (scipy's here, the others by _install)
cdef Table _tables[4]
_tables[0].ilp64 = 0
_tables[0].sgemm = <void*>sgemm
_tables[0].dgemm = <void*>dgemm
_tables[0].sgemv = <void*>sgemv
_tables[0].dgemv = <void*>dgemv
cdef Table* _cur = &_tables[0]
# set while the automatic choice waits for its calibration (MKL installed, no NNRT_BLAS)
cdef int _pending = 0


cdef void _resolve_pending() noexcept nogil:
    with gil:
        try:
            resolve()
        except Exception:  # the calibration failed: keep the default (resolve recorded why)
            pass


cdef inline Table* _table() noexcept nogil:
    if _pending:
        _resolve_pending()
    return _cur


cdef inline void _gemm(const Table* t, bint trans_a, bint trans_b, int m, int n, int k,
                       floating alpha, const floating* a, int lda, const floating* b, int ldb,
                       floating beta, floating* c, int ldc) noexcept nogil:
    # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: operands swapped
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'T' if trans_a else b'N'
    cdef int64_t m64 = n, n64 = m, k64 = k, la = ldb, lb = lda, lc = ldc
    if floating is float:
        if t.ilp64:
            (<sgemm64_t>t.sgemm)(&ta, &tb, &m64, &n64, &k64, &alpha, b, &la, a, &lb, &beta,
                                 c, &lc)
        else:
            (<sgemm32_t>t.sgemm)(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)
    else:
        if t.ilp64:
            (<dgemm64_t>t.dgemm)(&ta, &tb, &m64, &n64, &k64, &alpha, b, &la, a, &lb, &beta,
                                 c, &lc)
        else:
            (<dgemm32_t>t.dgemm)(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)


cdef inline void _gemv(const Table* t, bint trans, int m, int n, floating alpha,
                       const floating* a, int lda, const floating* x, floating beta,
                       floating* y) noexcept nogil:
    # row-major A (m x n) is column-major A^T (n x m): y = A x is 'T', y = A^T x is 'N'
    cdef char tr = b'N' if trans else b'T'
    cdef int one = 1
    cdef int64_t m64 = n, n64 = m, l64 = lda, one64 = 1
    if floating is float:
        if t.ilp64:
            (<sgemv64_t>t.sgemv)(&tr, &m64, &n64, &alpha, a, &l64, x, &one64, &beta, y, &one64)
        else:
            (<sgemv32_t>t.sgemv)(&tr, &n, &m, &alpha, a, &lda, x, &one, &beta, y, &one)
    else:
        if t.ilp64:
            (<dgemv64_t>t.dgemv)(&tr, &m64, &n64, &alpha, a, &l64, x, &one64, &beta, y, &one64)
        else:
            (<dgemv32_t>t.dgemv)(&tr, &n, &m, &alpha, a, &lda, x, &one, &beta, y, &one)


# ------------------------------------------------------------- nnrt's own GEMM kernel
# The register-blocked kernel of nnrt/_smallm.h (strided variant) as a route of the
# GEMMs with alpha 1 and beta 0 or 1 (the forward's Y = b + X W): bit 1 NN (forward
# X W), bit 2 TN (dW = X^T dY: X read transposed in place), bit 4 NT (dX = dY W^T: W
# transposed into a per-call scratch buffer). One set of routes per dtype; 0 = the
# BLAS backend. Set by use_kernel / NNRT_GEMM_KERNEL / the calibration.
cdef int _kroutes_f = 0
cdef int _kroutes_d = 0
# the kernel serves outputs at least this wide and a multiple of 8 wide (its last
# columns otherwise run as scalars)
cdef int _KERNEL_MIN_N = 32
# narrower outputs (9 .. _KERNEL_MIN_N - 1 columns) take the padded kernel from this work up
cdef double _NARROW_MIN_MACS = 65536
# GEMMs the kernel served (tests check the route is taken; a race between threads may
# lose a count, never corrupt anything)
cdef Py_ssize_t _kernel_count = 0


def _kernel_calls():
    """How many GEMMs nnrt's kernel has served in this process (tests)."""
    return _kernel_count


cdef inline int _route_bit(bint ta, bint tb) noexcept nogil:
    if ta and tb:
        return 0
    return 2 if ta else 4 if tb else 1


# nnrt._parallel's par_gemm (the kernel's rows or columns over nnrt's helper thread when
# the thread policy picked two threads for the calling thread's GEMM), bound at run time
# by _bind_par_for: nnrt._parallel cimports this module, so this one cannot cimport it
# back. NULL: one thread.
ctypedef void (*par_fn_t)(void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil
ctypedef int (*par_gemm_t)(par_fn_t fn, void* ctx, Py_ssize_t n, long nchunks,
                           Py_ssize_t align) noexcept nogil
cdef par_gemm_t _par_for = NULL


def _bind_par_for():
    global _par_for
    from nnrt import _parallel

    _par_for = <par_gemm_t><uintptr_t>_parallel._par_gemm_address()


# How a kernel GEMM is split over two threads (docs/performance.md "Threads"): into
# _split_chunks contiguous pieces (claimed one at a time by the two threads: a late
# helper leaves more to the caller) of C's rows, or of its columns when there are too
# few rows for that many pieces of 8. A piece of rows streams all of W once (the kernel
# keeps a block of W in L2 while every row block of the piece reads it): few pieces
# keep those re-reads few. Rows measured faster than columns on the benchmark shapes
# (a piece of columns re-reads all of X and runs narrower column blocks). Mode 0
# (measurements): always rows; 1: rows, columns for few rows; 2: always columns.
cdef int _split_mode = 1
cdef int _split_chunks = 4


def _set_split(mode=None, chunks=None):
    """Change the kernel's split (measurements); returns the previous (mode, chunks)."""
    global _split_mode, _split_chunks
    old = (_split_mode, _split_chunks)
    if mode is not None:
        if mode not in (0, 1, 2):
            raise ValueError("mode must be 0 (rows), 1 (rows; columns for few rows) "
                             "or 2 (columns)")
        _split_mode = mode
    if chunks is not None:
        if not 2 <= chunks <= 64:
            raise ValueError("chunks must be in [2, 64]")
        _split_chunks = chunks
    return old


ctypedef struct _KJob:
    # one kernel call, split by rows of C (rows [lo, hi) read rows lo.. of op(A)) or by
    # columns (columns [lo, hi) read columns lo.. of W)
    const void* a
    Py_ssize_t xi, xk
    const void* w
    Py_ssize_t ldw
    void* c
    Py_ssize_t ldc
    int acc
    Py_ssize_t m, k, n


cdef void _kjob_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _KJob* j = <_KJob*>ctx
    nnrt_gemm_s_f(<const float*>j.a + lo * j.xi, j.xi, j.xk, <const float*>j.w, j.ldw,
                  <float*>j.c + lo * j.ldc, j.ldc, j.acc, hi - lo, j.k, j.n)


cdef void _kjob_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _KJob* j = <_KJob*>ctx
    nnrt_gemm_s_d(<const double*>j.a + lo * j.xi, j.xi, j.xk, <const double*>j.w, j.ldw,
                  <double*>j.c + lo * j.ldc, j.ldc, j.acc, hi - lo, j.k, j.n)


cdef void _kjob_cols_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _KJob* j = <_KJob*>ctx
    nnrt_gemm_s_f(<const float*>j.a, j.xi, j.xk, <const float*>j.w + lo, j.ldw,
                  <float*>j.c + lo, j.ldc, j.acc, j.m, j.k, hi - lo)


cdef void _kjob_cols_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _KJob* j = <_KJob*>ctx
    nnrt_gemm_s_d(<const double*>j.a, j.xi, j.xk, <const double*>j.w + lo, j.ldw,
                  <double*>j.c + lo, j.ldc, j.acc, j.m, j.k, hi - lo)


cdef void _kernel_split(const floating* a, Py_ssize_t xi, Py_ssize_t xk, const floating* w,
                        Py_ssize_t ldw, floating* c, Py_ssize_t ldc, int acc, Py_ssize_t m,
                        Py_ssize_t k, Py_ssize_t n, bint split) noexcept nogil:
    # C on one thread, or its rows or columns over two through par_gemm. Each output
    # element is the same chain of fused multiply-adds over p = 0 .. k-1 whatever rows
    # and columns share its call (nnrt/_smallm.h: a block of k stored to C and read
    # back is exact), so the split is bit-identical to one thread.
    cdef _KJob job
    job.a = a
    job.xi = xi
    job.xk = xk
    job.w = w
    job.ldw = ldw
    job.c = c
    job.ldc = ldc
    job.acc = acc
    job.m = m
    job.k = k
    job.n = n
    cdef long chunks
    cdef bint cols = _split_mode == 2 or (_split_mode == 1 and m < 8 * _split_chunks)
    if split and _par_for != NULL:
        if cols and n >= 64:
            # pieces at least 32 columns wide, on 16-column (64-byte) boundaries: every
            # piece's width stays a multiple of 8 (the kernel's vector paths)
            chunks = min(<long>_split_chunks, <long>(n // 32))
            _par_for(<par_fn_t>(_kjob_cols_f if floating is float else _kjob_cols_d), &job,
                     n, chunks, 16)
            return
        if m >= 16:
            # pieces of whole 8-row blocks
            chunks = min(<long>_split_chunks, <long>(m // 8))
            _par_for(<par_fn_t>(_kjob_f if floating is float else _kjob_d), &job, m,
                     chunks, 8)
            return
    if floating is float:
        _kjob_f(&job, 0, m)
    else:
        _kjob_d(&job, 0, m)


# ------------------------------------------------------------- background prefetch
cdef Py_ssize_t prefetch_set(const char* base, const Py_ssize_t* rows, Py_ssize_t n,
                             Py_ssize_t row_bytes) noexcept nogil:
    return nnrt_bgpf_set(base, rows, n, row_bytes)


cdef void prefetch_clear(int release) noexcept nogil:
    nnrt_bgpf_clear(release)


def prefetch_rows(object src, object rows):
    """Queue rows ``rows`` of ``src`` to be prefetched by this thread's kernel GEMMs.

    nnrt/_smallm.h's training kernel issues one prefetch of the queue every few steps
    of its inner loop, overlapping the loads with its arithmetic (fit queues the next
    batch's rows while this one trains: the gather then copies from cache, not from
    memory). ``src``: a C-contiguous ndarray of at least one dimension; ``rows``: a
    1-D intp array of row indices in ``[0, len(src))`` (IndexError otherwise; nothing
    queued). Replaces what this thread had queued; returns the number of cache lines
    queued (0 where the kernel has no prefetch). Changes no result: the queue holds
    its own copy of the offsets, and ``src``'s memory is only ever prefetched, never
    read, so it may be freed or resized while queued.
    """
    if not isinstance(src, np.ndarray) or not isinstance(rows, np.ndarray):
        raise TypeError("prefetch_rows: src and rows must be numpy arrays")
    cdef cnp.ndarray s = <cnp.ndarray>src
    cdef cnp.ndarray r = <cnp.ndarray>rows
    if cnp.PyArray_NDIM(s) < 1 or not cnp.PyArray_IS_C_CONTIGUOUS(s):
        raise ValueError("prefetch_rows: src must be C-contiguous with at least one dimension")
    if (cnp.PyArray_TYPE(r) != cnp.NPY_INTP or cnp.PyArray_NDIM(r) != 1
            or not cnp.PyArray_IS_C_CONTIGUOUS(r)):
        raise ValueError("prefetch_rows: rows must be a contiguous 1-D intp array")
    cdef Py_ssize_t n = cnp.PyArray_DIM(r, 0), nrows = cnp.PyArray_DIM(s, 0), i
    cdef const Py_ssize_t* ip = <const Py_ssize_t*>cnp.PyArray_DATA(r)
    for i in range(n):
        if ip[i] < 0 or ip[i] >= nrows:
            raise IndexError(f"prefetch_rows: row {ip[i]} is out of bounds for {nrows} rows")
    if nrows == 0:
        nnrt_bgpf_clear(0)
        return 0
    cdef Py_ssize_t row = cnp.PyArray_NBYTES(s) // nrows
    cdef Py_ssize_t lines = nnrt_bgpf_set(<const char*>cnp.PyArray_DATA(s), ip, n, row)
    if lines < 0:
        raise MemoryError("prefetch_rows: no memory for the row offsets")
    return lines


def prefetch_left():
    """Cache lines this thread's prefetch queue still holds (tests, measurements)."""
    return nnrt_bgpf_left()


def prefetch_clear(bint release=False):
    """Empty this thread's prefetch queue (``release``: free its offsets too)."""
    nnrt_bgpf_clear(release)


# The NT route's transposed B, kept between calls (grown to the largest seen up to
# _SCRATCH_KEEP bytes; one caller at a time, others allocate their own): a fresh
# allocation of megabytes per call is a fresh mmap whose page faults cost more than the
# transpose itself. Larger copies are allocated per call (there the GEMM dwarfs the
# faults). Both are 64-byte aligned, rows nnrt_aligned_ld apart (nnrt/_smallm.h).
cdef extern from *:
    """
    #if defined(_MSC_VER)
    #include <intrin.h>
    static int nnrt_blas_flag_take(volatile long *f) { return _InterlockedExchange(f, 1) == 0; }
    static void nnrt_blas_flag_give(volatile long *f) { _InterlockedExchange(f, 0); }
    #else
    static int nnrt_blas_flag_take(volatile long *f) {
        return __atomic_exchange_n(f, 1, __ATOMIC_ACQUIRE) == 0;
    }
    static void nnrt_blas_flag_give(volatile long *f) { __atomic_store_n(f, 0, __ATOMIC_RELEASE); }
    #endif
    """
    bint nnrt_blas_flag_take(long* f) nogil
    void nnrt_blas_flag_give(long* f) nogil

cdef size_t _SCRATCH_KEEP = 16 << 20
cdef void* _scratch = NULL
cdef size_t _scratch_size = 0
cdef long _scratch_busy = 0


cdef bint _scratch_take(size_t size) noexcept nogil:
    # the kept buffer (64-byte aligned), at least size bytes, for this caller alone;
    # False: allocate one
    global _scratch, _scratch_size
    if size > _SCRATCH_KEEP or not nnrt_blas_flag_take(&_scratch_busy):
        return False
    if _scratch_size < size:
        nnrt_aligned_free(_scratch)
        _scratch = nnrt_aligned_alloc(size)
        _scratch_size = size if _scratch != NULL else 0
        if _scratch == NULL:
            nnrt_blas_flag_give(&_scratch_busy)
            return False
    return True


cdef void _scratch_give() noexcept nogil:
    nnrt_blas_flag_give(&_scratch_busy)


ctypedef struct _TJob:
    # bt (k x n, row stride ldt) = the transpose of b (n x k, row stride ldb), rows of bt
    # [lo, hi) per call
    const void* b
    Py_ssize_t ldb
    void* bt
    Py_ssize_t ldt, n


cdef void _tjob_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _TJob* t = <_TJob*>ctx
    nnrt_transpose_f(<const float*>t.b + lo, t.ldb, t.n, hi - lo, <float*>t.bt + lo * t.ldt,
                     t.ldt)


cdef void _tjob_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _TJob* t = <_TJob*>ctx
    nnrt_transpose_d(<const double*>t.b + lo, t.ldb, t.n, hi - lo,
                     <double*>t.bt + lo * t.ldt, t.ldt)


cdef bint _kernel_narrow(const floating* a, Py_ssize_t xi, Py_ssize_t xk, const floating* w,
                         Py_ssize_t ldw, floating* c, Py_ssize_t ldc, int acc, Py_ssize_t m,
                         Py_ssize_t k, Py_ssize_t n, bint split) noexcept nogil:
    # C (m x n, n < _KERNEL_MIN_N) = op(A) W (+ C when acc) through the kernel on copies
    # padded to np columns, a multiple of 16 (whole vectors: the kernel's last columns
    # would otherwise run as scalar chains, slower than a BLAS): W's copy zero-padded,
    # C's computed in a scratch and its first n columns copied back. Each element is the
    # kernel's one chain of FMAs over p, as in any other call. False: no memory.
    # Measured on Zen 5 (AVX-512), float32, one thread, against OpenBLAS (Haswell
    # kernels), a 10-class output layer's forward (NN, m x 10 x k) and weight gradient
    # (TN): 64 x 10 x 128 1.76 vs 2.31 us, TN 128 x 10 x 64 2.09 vs 2.34 us, 1024 x 10 x
    # 1024 167 vs 373 us, TN 263 vs 388 us; but 1.1-1.7x slower below ~64K
    # multiply-adds (the copies' fixed cost) or at 8 columns and fewer (padding to 16
    # doubles the work or more): those stay with the BLAS (_kernel_gemm).
    cdef Py_ssize_t np_ = (n + 15) & ~(<Py_ssize_t>15), i, p, j
    cdef size_t size = (<size_t>k + <size_t>m) * <size_t>np_ * sizeof(floating)
    cdef bint kept = _scratch_take(size)
    cdef floating* wp = <floating*>_scratch if kept else <floating*>nnrt_aligned_alloc(size)
    if wp == NULL:
        return False
    cdef floating* cp = wp + k * np_
    for p in range(k):
        for j in range(n):
            wp[p * np_ + j] = w[p * ldw + j]
        for j in range(n, np_):
            wp[p * np_ + j] = 0
    if acc:
        for i in range(m):
            for j in range(n):
                cp[i * np_ + j] = c[i * ldc + j]
            for j in range(n, np_):
                cp[i * np_ + j] = 0
    _kernel_split(a, xi, xk, wp, np_, cp, np_, acc, m, k, np_, split)
    for i in range(m):
        for j in range(n):
            c[i * ldc + j] = cp[i * np_ + j]
    if kept:
        _scratch_give()
    else:
        nnrt_aligned_free(wp)
    return True


cdef bint _kernel_gemm(bint ta, bint tb, int m, int n, int k, floating alpha,
                       const floating* a, int lda, const floating* b, int ldb,
                       floating beta, floating* c, int ldc, bint split) noexcept nogil:
    """C = op(A) op(B) (beta 0: C not read) or C + op(A) op(B) (beta 1) through nnrt's
    kernel, or False (nothing done) when the call does not qualify: alpha != 1, beta
    neither 0 nor 1, TT, n from the minimum up but not a multiple of 8, n below the
    minimum in NT, a leading dimension below its row length, or no memory for the
    scratch copy. n below the minimum runs padded (_kernel_narrow). ``split``: rows over two
    threads when the thread policy allows (the calibration times one thread)."""
    cdef Py_ssize_t xi, xk, ldt
    cdef Py_ssize_t M = m, N = n, K = k, LDB = ldb
    cdef floating* bt = NULL
    cdef int acc = beta == 1
    if alpha != 1 or (beta != 0 and beta != 1) or (ta and tb):
        return False
    if m < 1 or k < 1 or n < 1 or ldc < n or (n >= _KERNEL_MIN_N and n % 8 != 0):
        return False
    if ta:  # A stored k x m
        if lda < m:
            return False
        xi = 1
        xk = lda
    else:
        if lda < k:
            return False
        xi = lda
        xk = 1
    if n < _KERNEL_MIN_N:  # a narrow output (a classifier's last layer): padded
        if (tb or ldb < n or n <= 8
                or <double>M * <double>N * <double>K < _NARROW_MIN_MACS):
            return False
        return _kernel_narrow(a, xi, xk, b, ldb, c, ldc, acc, M, K, N, split)
    if not tb:
        if ldb < n:
            return False
        _kernel_split(a, xi, xk, b, ldb, c, ldc, acc, M, K, N, split)
        return True
    # B stored n x k (row stride ldb >= k): its transpose, k x n, into a 64-byte
    # aligned scratch whose rows are never a multiple of 4 KB apart (they would share
    # L1 sets, in the transpose's stores and in the kernel's reads)
    if ldb < k:
        return False
    ldt = nnrt_aligned_ld(N, sizeof(floating))
    cdef size_t size = <size_t>K * <size_t>ldt * sizeof(floating)
    cdef bint kept = _scratch_take(size)
    bt = <floating*>_scratch if kept else <floating*>nnrt_aligned_alloc(size)
    if bt == NULL:
        return False
    cdef _TJob tj
    tj.b = b
    tj.ldb = LDB
    tj.bt = bt
    tj.ldt = ldt
    tj.n = N
    cdef par_fn_t tfn = <par_fn_t>(_tjob_f if floating is float else _tjob_d)
    if split and _par_for != NULL and K >= 64:
        _par_for(tfn, &tj, K, 4, 32)  # blocks of 32 rows of the transpose
    else:
        tfn(&tj, 0, K)
    _kernel_split(a, xi, xk, bt, ldt, c, ldc, acc, M, K, N, split)
    if kept:
        _scratch_give()
    else:
        nnrt_aligned_free(bt)
    return True


cdef void sgemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                   float alpha, const float* a, int lda, const float* b, int ldb,
                   float beta, float* c, int ldc) noexcept nogil:
    cdef Table* t = _table()
    global _kernel_count
    if (_kroutes_f & _route_bit(trans_a, trans_b)):
        if _kernel_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, True):
            _kernel_count += 1
            return
    _gemm(t, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef void dgemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                   double alpha, const double* a, int lda, const double* b, int ldb,
                   double beta, double* c, int ldc) noexcept nogil:
    cdef Table* t = _table()
    global _kernel_count
    if (_kroutes_d & _route_bit(trans_a, trans_b)):
        if _kernel_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, True):
            _kernel_count += 1
            return
    _gemm(t, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef void sgemv_rm(bint trans, int m, int n, float alpha, const float* a, int lda,
                   const float* x, float beta, float* y) noexcept nogil:
    _gemv(_table(), trans, m, n, alpha, a, lda, x, beta, y)


cdef void dgemv_rm(bint trans, int m, int n, double alpha, const double* a, int lda,
                   const double* x, double beta, double* y) noexcept nogil:
    _gemv(_table(), trans, m, n, alpha, a, lda, x, beta, y)


cdef int blas_get_threads() noexcept nogil:
    cdef Table* t = _table()
    cdef get_threads_t get = <get_threads_t>t.get_threads
    return get() if get != NULL else -1


cdef int blas_set_threads(int n) noexcept nogil:
    cdef Table* t = _table()
    cdef set_threads_t put = <set_threads_t>t.set_threads
    if put == NULL or n < 1:
        return -1
    put(n)
    return 0


# ----------------------------------------------------------------- finding libraries

def find_numpy_openblas():
    """Path of numpy's bundled OpenBLAS (``libscipy_openblas64_*`` in ``numpy.libs/``,
    or ``numpy/.dylibs/`` on macOS), or None. The ``openblas`` backend's library."""
    import glob

    import numpy as np

    pkg = os.path.dirname(os.path.abspath(np.__file__))
    for where in (os.path.join(os.path.dirname(pkg), "numpy.libs"), os.path.join(pkg, ".dylibs")):
        for path in sorted(glob.glob(os.path.join(where, "libscipy_openblas64_*"))):
            return path
    return None


def find_mkl():
    """Path of MKL's ``libmkl_rt`` installed next to this Python (the ``mkl`` wheel puts
    it in ``<prefix>/lib``), or None. A file check only: nothing is loaded."""
    import glob

    names = ("libmkl_rt.so*", "libmkl_rt*.dylib", "mkl_rt*.dll")
    seen = set()
    for prefix in (sys.prefix, sys.base_prefix):
        for sub in ("lib", os.path.join("Library", "bin")):
            where = os.path.join(prefix, sub)
            if where in seen or not os.path.isdir(where):
                continue
            seen.add(where)
            for name in names:
                found = sorted(glob.glob(os.path.join(where, name)), reverse=True)
                if found:
                    return found[0]
    return None


def _find_scipy_openblas():
    import importlib.util

    spec = importlib.util.find_spec("scipy_openblas64")
    if spec is None or not spec.submodule_search_locations:
        return None
    import glob

    libdir = os.path.join(next(iter(spec.submodule_search_locations)), "lib")
    for pattern in ("libscipy_openblas64_*.so*", "libscipy_openblas64_*.dylib",
                    "libscipy_openblas64_*.dll"):
        found = sorted(glob.glob(os.path.join(libdir, pattern)))
        if found:
            return found[0]
    return None


def _library_of(uintptr_t address):
    """The shared library holding ``address`` (dladdr), or None."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):  # pragma: no cover - no dladdr (Windows)
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    dladdr.restype = ctypes.c_int
    found = DlInfo()
    if not dladdr(ctypes.c_void_p(address), ctypes.byref(found)) or not found.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(found.dli_fname))


# ------------------------------------------------------------------ loaded backends

class _Lib:
    """One loaded backend: its library, integer width and thread/version queries."""

    def __init__(self, name, path, ilp64, handle, get_threads, set_threads, library, kernel):
        self.name = name
        self.path = path
        self.ilp64 = ilp64
        self.handle = handle  # kept for the life of the process: the table points into it
        self.get_threads = get_threads
        self.set_threads = set_threads
        self.library = library
        self.kernel = kernel
        self.set_global = None  # MKL: the process-wide count besides the thread's own


_libs = {}            # name -> _Lib, once loaded
_load_errors = {}     # name -> why it could not be loaded
_lock = threading.RLock()


def _new_lock_in_child():
    global _lock
    _lock = threading.RLock()  # a fork during a calibration must not leave it held


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)
_state = {"backend": "scipy", "reason": "", "requested": None, "calibration": None, "note": ""}


def _address_of(fn):
    """The C address of a ctypes function (0 for None)."""
    import ctypes

    return 0 if fn is None else (ctypes.cast(fn, ctypes.c_void_p).value or 0)


def thread_control_addresses():
    """(set, get) C addresses of the thread controls of the backend in use,
    ``void set(int)`` and ``int get(void)``, or None when it has none (C code
    cimports ``blas_set_threads``/``blas_get_threads`` from nnrt/_blas.pxd instead)."""
    resolve()
    lib = _libs[_state["backend"]]
    if lib.set_threads is None or lib.get_threads is None:
        return None
    return _address_of(lib.set_threads), _address_of(lib.get_threads)


def _address(handle, symbol):
    import ctypes

    return ctypes.cast(getattr(handle, symbol), ctypes.c_void_p).value or 0


cdef int _fill(int slot, int ilp64, uintptr_t s, uintptr_t d, uintptr_t sv,
               uintptr_t dv, uintptr_t set_n, uintptr_t get_n) except -1:
    """Fill a backend's table once, with four non-NULL BLAS entry points (the thread
    controls may be 0: not available). Slot 0 (scipy) only gets its thread controls."""
    if _tables[slot].get_threads == NULL and set_n and get_n:
        _tables[slot].set_threads = <void*>set_n
        _tables[slot].get_threads = <void*>get_n
    if slot == 0:
        return 0
    if slot < 0 or slot >= 4 or not (s and d and sv and dv):
        raise RuntimeError("a BLAS entry point is missing")
    if _tables[slot].sgemm != NULL:
        return 0  # filled before, never rewritten (another thread may be calling it)
    _tables[slot].ilp64 = ilp64
    _tables[slot].dgemm = <void*>d
    _tables[slot].sgemv = <void*>sv
    _tables[slot].dgemv = <void*>dv
    _tables[slot].sgemm = <void*>s  # last: a filled table has every entry
    return 0


def _openblas_lib(name, path, suffix, prefix="scipy_"):
    """Load an OpenBLAS: a scipy-openblas build (symbols ``scipy_<f><suffix>``,
    ``scipy_openblas_get_num_threads`` ...) or, with ``prefix=""``, a plain one."""
    import ctypes

    handle = ctypes.CDLL(path)
    addrs = [_address(handle, f"{prefix}{f}{suffix}") for f in ("sgemm", "dgemm", "sgemv", "dgemv")]
    ilp64 = suffix == "_64_"
    tag = "64_" if ilp64 else ""
    get_n = set_n = None
    try:  # without them, threadpoolctl answers and sets the thread count
        get_n = getattr(handle, f"{prefix}openblas_get_num_threads{tag}")
        get_n.restype = ctypes.c_int
        get_n.argtypes = []
        set_n = getattr(handle, f"{prefix}openblas_set_num_threads{tag}")
        set_n.restype = None
        set_n.argtypes = [ctypes.c_int]
    except AttributeError:  # pragma: no cover - an older build
        get_n = set_n = None
    library = kernel = None
    try:
        config = getattr(handle, f"{prefix}openblas_get_config{tag}")
        config.restype = ctypes.c_char_p
        corename = getattr(handle, f"{prefix}openblas_get_corename{tag}")
        corename.restype = ctypes.c_char_p
        library = " ".join(config().decode(errors="replace").split()[:2])  # "OpenBLAS 0.3.31"
        kernel = corename().decode(errors="replace")
    except (AttributeError, OSError):  # pragma: no cover - an older build
        pass
    lib = _Lib(name, os.path.realpath(path), ilp64, handle, get_n, set_n, library, kernel)
    return lib, addrs


_MKL_BRANCH = {2: "COMPATIBLE", 3: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
               10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1",
               14: "AVX512_E1"}


def _mkl_lib(path):
    import ctypes

    handle = ctypes.CDLL(path)
    try:
        addrs = [_address(handle, f"{f}_64") for f in ("sgemm", "dgemm", "sgemv", "dgemv")]
        ilp64 = True
    except AttributeError:  # an MKL without the _64 ILP64 entry points: LP64 Fortran names
        addrs = [_address(handle, f"{f}_") for f in ("sgemm", "dgemm", "sgemv", "dgemv")]
        ilp64 = False
    get_n = handle.MKL_Get_Max_Threads
    get_n.restype = ctypes.c_int
    get_n.argtypes = []
    # the calling thread's count, as threadpoolctl sets it (a thread-local count
    # overrides the global one, so setting only the global would be ignored after
    # threadpoolctl ran); it returns the previous local count (0: none), which the
    # C table's void(int) type ignores harmlessly
    set_n = handle.MKL_Set_Num_Threads_Local
    set_n.restype = ctypes.c_int
    set_n.argtypes = [ctypes.c_int]
    set_global = handle.MKL_Set_Num_Threads
    set_global.restype = None
    set_global.argtypes = [ctypes.c_int]
    library = kernel = None
    try:
        buf = ctypes.create_string_buffer(256)
        handle.MKL_Get_Version_String(buf, ctypes.c_int(len(buf)))
        words = buf.value.decode(errors="replace").split()
        version = next((w for w in words if w[:1].isdigit()), "")
        library = f"MKL {version}".strip()
        branch = handle.MKL_CBWR_Get_Auto_Branch
        branch.restype = ctypes.c_int
        code = int(branch())
        kernel = f"{_MKL_BRANCH.get(code, f'branch {code}')} code path (MKL CNR branch)"
    except (AttributeError, OSError):  # pragma: no cover - an older MKL
        pass
    lib = _Lib("mkl", os.path.realpath(path), ilp64, handle, get_n, set_n, library, kernel)
    lib.set_global = set_global
    return lib, addrs


def _scipy_lib():
    """scipy.linalg.cython_blas's backend: its table is filled at init; the library
    (found with dladdr) answers thread and version queries when it is a scipy-openblas."""
    import ctypes

    # the table holds cython_blas's wrappers; the OpenBLAS behind them is a dependency
    path = _library_of(<uintptr_t>_tables[0].sgemm)
    if path is not None:
        # scipy >= 1.14 bundles scipy-openblas32 (scipy_sgemm_ ...); 1.13 a plain OpenBLAS
        for prefix in ("scipy_", ""):
            try:
                lib_path = _library_of(_address(ctypes.CDLL(path), f"{prefix}sgemm_")) or path
                return _openblas_lib("scipy", lib_path, "_", prefix)[0], None
            except (OSError, AttributeError):
                continue
    # another BLAS (a system build): threadpoolctl answers the thread queries
    return _Lib("scipy", path, False, None, None, None, None, None), None


def _load(name):
    """The loaded backend ``name`` (loading it and filling its table the first time);
    raises RuntimeError saying why it is unavailable."""
    with _lock:
        if name in _libs:
            return _libs[name]
        if name not in _SLOT:
            raise ValueError(f"unknown BLAS backend {name!r}; expected one of {BACKENDS}")
        try:
            if name == "scipy":
                lib, addrs = _scipy_lib()
            elif name == "openblas":
                path = find_numpy_openblas()
                if path is None:
                    raise RuntimeError("numpy's bundled OpenBLAS (numpy.libs/"
                                       "libscipy_openblas64_*) was not found")
                lib, addrs = _openblas_lib(name, path, "_64_")
            elif name == "mkl":
                path = find_mkl()
                if path is None:
                    raise RuntimeError("MKL is not installed (pip install nnrt[mkl]: "
                                       "libmkl_rt in <prefix>/lib)")
                lib, addrs = _mkl_lib(path)
            else:
                path = _find_scipy_openblas()
                if path is None:
                    raise RuntimeError("the scipy-openblas64 wheel is not installed")
                lib, addrs = _openblas_lib(name, path, "_64_")
            if addrs is None:
                addrs = [0, 0, 0, 0]
            _fill(_SLOT[name], lib.ilp64, addrs[0], addrs[1], addrs[2], addrs[3],
                  _address_of(lib.set_threads), _address_of(lib.get_threads))
        except (OSError, AttributeError, RuntimeError) as exc:
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
            raise RuntimeError(f"BLAS backend {name!r} is unavailable: {exc}") from exc
        _libs[name] = lib
        return lib


cdef void _select(int slot) noexcept:
    global _cur
    if _tables[slot].sgemm != NULL:
        _cur = &_tables[slot]


def _set_backend(name, reason):
    _load(name)
    _select(_SLOT[name])
    _state["backend"] = name
    _state["reason"] = reason


def available():
    """Names of the backends that load on this machine, in order of preference
    (loading them: MKL's library is opened if installed)."""
    out = []
    for name in BACKENDS:
        try:
            _load(name)
        except RuntimeError:
            continue
        out.append(name)
    return out


def use(name):
    """Route nnrt's GEMMs through backend ``name`` from now on (tests, benchmarks);
    returns the previous one. ``NNRT_BLAS`` is the way to choose one for a program."""
    global _pending
    with _lock:
        _state["mkl_pending"] = False
        _pending = 1 if _kstate["pending"] or _par_for == NULL else 0
        previous = _state["backend"]
        _set_backend(name, f"set by nnrt._blas.use({name!r})")
        return previous


KERNEL_MODES = ("auto", "on", "off")


cdef void _set_routes(int f, int d) noexcept:
    global _kroutes_f, _kroutes_d
    _kroutes_f = f
    _kroutes_d = d


def _routes_of(int bits):
    return {"NN": bool(bits & 1), "TN": bool(bits & 2), "NT": bool(bits & 4)}


def use_kernel(mode):
    """Route nnrt's GEMMs through nnrt's own kernel (nnrt/_smallm.h) where the shape
    qualifies: ``"on"`` (every route, float32 and float64), ``"off"`` (the BLAS backend
    only) or ``"auto"`` (calibrated against the backend in use at the next GEMM;
    float32 routes only). Returns the previous mode. ``NNRT_GEMM_KERNEL`` is the way to
    choose one for a program."""
    global _pending
    if mode not in KERNEL_MODES:
        raise ValueError(f"GEMM kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    with _lock:
        previous = _kstate["mode"]
        _kstate["mode"] = mode
        _kstate["ratios"] = None
        if mode == "auto" and _kstate["isa"] == "baseline":
            _kstate["pending"] = False
            _set_routes(0, 0)
            _kstate["reason"] = ("auto: not calibrated (no AVX2/AVX-512 build of the "
                                 "kernel on this CPU): the BLAS backend")
        elif mode == "auto":
            _kstate["pending"] = True
            _kstate["reason"] = "auto: calibrated at the next GEMM"
            _pending = 1
        else:
            _kstate["pending"] = False
            _set_routes(7 if mode == "on" else 0, 7 if mode == "on" else 0)
            if mode == "on" and _par_for == NULL:
                _pending = 1  # bind the row split at the first GEMM
            _kstate["reason"] = f"set by nnrt._blas.use_kernel({mode!r})"
        return previous


# ----------------------------------------------------------------------- calibration

class _Operands:
    """Random operands of one GEMM (or GEMV) shape, made once and reused."""

    def __init__(self, dtype, m, n, k, trans_a=False, trans_b=False):
        import numpy as np

        dt = np.dtype(dtype)
        if dt != np.float32 and dt != np.float64:
            raise ValueError("dtype must be float32 or float64")
        if m < 1 or n < 1 or k < 1:
            raise ValueError("m, n and k must be positive")

        def fill(*shape):  # the values do not change a GEMM's time
            return np.full(shape, 0.5, dtype=dt)

        self.shape = (int(m), int(n), int(k), bool(trans_a), bool(trans_b))
        self.single = dt == np.float32
        self.A = fill(k, m) if trans_a else fill(m, k)
        self.B = fill(n, k) if trans_b else fill(k, n)
        self.C = np.zeros((m, n), dtype=dt)
        self.x = fill(k)
        self.y = np.zeros(m, dtype=dt)


def _time_calls(name, ops, int calls, bint gemv=False, bint cpu=False, bint kernel=False,
                bint smallm=False):
    """Seconds for ``calls`` GEMMs C = op(A) op(B) (or GEMVs y = A x, A m x k) of the
    operands ``ops`` through backend ``name``: a C loop with the GIL released. ``cpu``:
    the calling thread's CPU time (a 1-thread BLAS runs in it), which time slices
    given to other processes on a busy machine do not inflate; else wall time.
    ``kernel``: through nnrt's kernel route (one thread); ``smallm``: through the eval
    path's kernel (nnrt_smallm, NN only; benchmarks/gemm_shapes.py)."""
    import time

    clock = time.thread_time if cpu else time.perf_counter
    _load(name)
    cdef Table* t = &_tables[_SLOT[name]]
    cdef int m = ops.shape[0], n = ops.shape[1], k = ops.shape[2], _i
    cdef bint ta = ops.shape[3], tb = ops.shape[4], single = ops.single
    cdef int lda = ops.A.shape[1], ldb = ops.B.shape[1]
    cdef uintptr_t pa = ops.A.ctypes.data, pb = ops.B.ctypes.data, pc = ops.C.ctypes.data
    cdef uintptr_t px = ops.x.ctypes.data, py = ops.y.ctypes.data
    cdef bint ok = True
    if calls < 1:
        raise ValueError("calls must be positive")
    if smallm and (ta or tb):
        raise ValueError("the eval path's kernel runs NN products only")
    t0 = clock()
    with nogil:
        for _i in range(calls):
            if smallm and single:
                nnrt_smallm_f(<float*>pa, <float*>pb, <float*>pc, m, k, n, 0)
            elif smallm:
                nnrt_smallm_d(<double*>pa, <double*>pb, <double*>pc, m, k, n, 0)
            elif kernel and single:
                ok = _kernel_gemm(ta, tb, m, n, k, <float>1, <float*>pa, lda, <float*>pb, ldb,
                                  <float>0, <float*>pc, n, False)
            elif kernel:
                ok = _kernel_gemm(ta, tb, m, n, k, <double>1, <double*>pa, lda, <double*>pb,
                                  ldb, <double>0, <double*>pc, n, False)
            elif gemv and single:
                _gemv(t, False, m, k, 1, <float*>pa, k, <float*>px, 0, <float*>py)
            elif gemv:
                _gemv(t, False, m, k, 1, <double*>pa, k, <double*>px, 0, <double*>py)
            elif single:
                _gemm(t, ta, tb, m, n, k, 1, <float*>pa, lda, <float*>pb, ldb, 0,
                      <float*>pc, n)
            else:
                _gemm(t, ta, tb, m, n, k, 1, <double*>pa, lda, <double*>pb, ldb, 0,
                      <double*>pc, n)
            if not ok:
                break
    if not ok:
        raise ValueError(f"nnrt's kernel does not take the GEMM {ops.shape}")
    return clock() - t0


def _bench(name, dtype, m, n, k, calls=1, trans_a=False, trans_b=False, gemv=False):
    """Seconds for ``calls`` row-major GEMMs (m x n x k) through backend ``name``."""
    return _time_calls(name, _Operands(dtype, m, n, k, trans_a, trans_b), calls, gemv)


# float32 shapes of nnrt's benchmark networks (m, n, k, trans_a, trans_b): a forward
# X @ W, a weight gradient X.T @ dY and a small-batch forward
_CAL_SHAPES = ((256, 512, 784, False, False), (784, 512, 256, True, False),
               (16, 512, 784, False, False))
_CAL_MARGIN = 0.90  # MKL must take at most 90 % of OpenBLAS's time


class _at_one_thread:
    """Context: the libraries ``libs`` at one thread, their own counts restored after."""

    def __init__(self, libs):
        self.libs = libs
        self.saved = []

    def __enter__(self):
        for lib in self.libs:
            before = lib.get_threads() if lib.get_threads is not None else None
            if lib.set_threads is not None:
                previous = lib.set_threads(1)
                if lib.set_global is not None:  # MKL's local count: restore it (0: none)
                    before = previous
            self.saved.append(before)
        return self

    def __exit__(self, *exc):
        for lib, n in zip(self.libs, self.saved):
            if lib.set_threads is not None and n is not None:
                lib.set_threads(n)
        return False


# float32 shapes (m, n, k, trans_a, trans_b) per route of nnrt's kernel: the medium
# network's forward and a 1024^3 product (NN), its weight gradient (TN), its input
# gradient (NT)
_KCAL_SHAPES = {"NN": ((256, 512, 784, False, False), (1024, 1024, 1024, False, False)),
                "TN": ((784, 512, 256, True, False),),
                "NT": ((256, 784, 512, False, True),)}
_KERNEL_MARGIN = 0.95  # the kernel must take at most 95 % of the backend's time


def _calibrate_kernel():
    """Per route, best-of-3 float32 time of nnrt's kernel over the backend in use at one
    thread (thread CPU time); sets the float32 routes where the kernel takes at most
    _KERNEL_MARGIN of the backend's time. Returns {route: ratio}."""
    base = _state["backend"]
    with _at_one_thread([_load(base)]):
        operands = {r: [_Operands("float32", *sh) for sh in shapes]
                    for r, shapes in _KCAL_SHAPES.items()}
        best = {(r, kern): [float("inf")] * len(ops) for r, ops in operands.items()
                for kern in (False, True)}
        for ops in operands.values():  # warm up
            for op in ops:
                _time_calls(base, op, 1)
                _time_calls(base, op, 1, kernel=True)
        for _ in range(3):
            for r, ops in operands.items():
                for j, op in enumerate(ops):
                    m, n, k = op.shape[:3]
                    calls = max(1, 50_000_000 // (2 * m * n * k))
                    for kern in (False, True):  # interleaved
                        t = _time_calls(base, op, calls, cpu=True, kernel=kern) / calls
                        best[(r, kern)][j] = min(best[(r, kern)][j], t)
    ratios = {r: float(sum(best[(r, True)]) / sum(best[(r, False)])) for r in operands}
    bits = sum(b for r, b in (("NN", 1), ("TN", 2), ("NT", 4))
               if ratios[r] <= _KERNEL_MARGIN)
    _set_routes(bits, 0)
    _kstate["ratios"] = ratios
    _kstate["against"] = base
    chosen = [r for r in ("NN", "TN", "NT") if bits & {"NN": 1, "TN": 2, "NT": 4}[r]]
    _kstate["reason"] = (
        f"auto: calibrated against {base} at 1 thread (kernel/BLAS time "
        + ", ".join(f"{r} {ratios[r]:.2f}x" for r in ("NN", "TN", "NT"))
        + f"; the kernel is used at <= {_KERNEL_MARGIN:.2f}x): "
        + (f"float32 {'/'.join(chosen)} through nnrt's kernel" if chosen else "the BLAS"))
    return ratios


def _calibrate(candidates):
    """Best-of-5 float32 GEMM time of each candidate at one thread, in the calling
    thread's CPU time (each library's own thread count is restored afterwards);
    returns {name: seconds summed over shapes}."""
    with _at_one_thread([_load(name) for name in candidates]):
        best = {name: [float("inf")] * len(_CAL_SHAPES) for name in candidates}
        operands = [_Operands("float32", *shape) for shape in _CAL_SHAPES]
        for name in candidates:  # warm up: first calls load kernels and pools
            for ops in operands:
                _time_calls(name, ops, 1)
        for _ in range(5):
            for name in candidates:  # interleaved
                for j, ops in enumerate(operands):
                    m, n, k = ops.shape[:3]
                    calls = max(1, 100_000_000 // (2 * m * n * k))  # loop the small shape
                    t = _time_calls(name, ops, calls, cpu=True) / calls
                    best[name][j] = min(best[name][j], t)
        return {name: float(sum(v)) for name, v in best.items()}


def _resolve_mkl():
    base = _state["backend"]
    try:
        _load("mkl")
    except RuntimeError as exc:
        _state["reason"] += f"; MKL found but not usable ({exc})"
        return
    times = _calibrate([base, "mkl"])
    _state["calibration"] = {
        "shapes": [list(s[:3]) + [("T" if s[3] else "N") + ("T" if s[4] else "N")]
                   for s in _CAL_SHAPES],
        "seconds": times,
        "margin": _CAL_MARGIN,
    }
    ratio = times["mkl"] / times[base]
    what = (f"{_state['note']}calibrated: MKL took {ratio:.2f}x the time of {base} on "
            f"float32 GEMMs at 1 thread (MKL is chosen at <= {_CAL_MARGIN:.2f}x)")
    if ratio <= _CAL_MARGIN:
        _set_backend("mkl", what)
    else:
        _state["reason"] = what


def resolve():
    """Finish the automatic choices still pending: the backend (MKL installed, no
    ``NNRT_BLAS``: calibrate ``openblas`` against ``mkl`` and keep the faster), then
    nnrt's kernel routes (``NNRT_GEMM_KERNEL=auto``, the default: calibrate the kernel
    against the backend per route); a no-op otherwise. The first GEMM calls it; so do
    ``info()`` and ``nnrt.set_num_threads``."""
    global _pending
    if not _pending:
        return
    with _lock:
        if not _pending:
            return
        try:
            if _par_for == NULL:
                _bind_par_for()
            if _state["mkl_pending"]:
                _state["mkl_pending"] = False
                try:
                    _resolve_mkl()
                except Exception as exc:
                    _state["reason"] += (f"; calibration failed ({type(exc).__name__}: "
                                         f"{exc})")
                    raise
            if _kstate["pending"]:
                _kstate["pending"] = False
                try:
                    _calibrate_kernel()
                except Exception as exc:
                    _set_routes(0, 0)
                    _kstate["reason"] = (f"auto: calibration failed ({type(exc).__name__}: "
                                         f"{exc}): the BLAS")
                    raise
        finally:
            _pending = 0


def _init():
    global _pending
    requested = os.environ.get("NNRT_BLAS", "").strip().lower()
    _state["requested"] = requested or None
    note = ""
    if requested and requested != "auto":
        if requested not in _SLOT:
            note = f"NNRT_BLAS={requested!r} is not one of {', '.join(BACKENDS)}"
        else:
            try:
                _set_backend(requested, f"forced by NNRT_BLAS={requested}")
                return
            except RuntimeError as exc:
                note = f"NNRT_BLAS={requested}: {exc}"
        from nnrt.warnings import warn_user

        warn_user(f"{note}; using the default BLAS backend", RuntimeWarning)
        note += "; "
    _state["note"] = note
    try:
        _set_backend("openblas", note + "default: numpy's OpenBLAS")
    except RuntimeError as exc:
        _set_backend("scipy", note + f"default fallback ({exc})")
        return  # nothing to calibrate MKL against
    if find_mkl() is not None:
        _state["reason"] += " (MKL installed: calibrated at the first GEMM)"
        _state["mkl_pending"] = True
        _pending = 1


def _init_kernel():
    mode = os.environ.get("NNRT_GEMM_KERNEL", "").strip().lower() or "auto"
    _kstate["requested"] = os.environ.get("NNRT_GEMM_KERNEL") or None
    if mode not in KERNEL_MODES:
        from nnrt.warnings import warn_user

        warn_user(f"NNRT_GEMM_KERNEL={mode!r} is not one of {', '.join(KERNEL_MODES)}; "
                  "using auto", RuntimeWarning)
        mode = "auto"
    use_kernel(mode)
    if mode != "auto":
        _kstate["reason"] = f"forced by NNRT_GEMM_KERNEL={mode}"


_kstate = {"mode": "off", "pending": False, "reason": "", "ratios": None, "against": None,
           "requested": None, "isa": nnrt_smallm_isa_name().decode()}
_state["mkl_pending"] = False
_init()
_init_kernel()


# -------------------------------------------------------------------------- queries

def threads():
    """Threads of the backend in use (its own query; threadpoolctl's view as a fallback)."""
    resolve()
    lib = _libs[_state["backend"]]
    if lib.get_threads is not None:
        return int(lib.get_threads())
    from threadpoolctl import threadpool_info

    infos = [d for d in threadpool_info() if d.get("user_api") == "blas"]
    for d in infos:
        if lib.path and os.path.realpath(d.get("filepath", "")) == lib.path:
            return int(d["num_threads"])
    return int(max((d["num_threads"] for d in infos), default=1))


def set_threads(int n):
    """Set the thread count of the backend in use (``nnrt.set_num_threads`` also sets
    every other loaded BLAS through threadpoolctl)."""
    if n < 1:
        raise ValueError(f"n must be a positive int, got {n}")
    resolve()
    lib = _libs[_state["backend"]]
    if lib.set_global is not None:
        lib.set_global(n)
    if lib.set_threads is not None:
        lib.set_threads(n)


def info():
    """The backend in use, as a dict: ``backend``, ``library`` (name and version),
    ``kernel`` (OpenBLAS core, or MKL's code path), ``threads``, ``int`` (LP64/ILP64),
    ``filepath``, ``reason`` (default/forced/calibrated, and why), ``calibration``
    (seconds per candidate when one ran) and ``requested`` (``NNRT_BLAS``)."""
    try:
        resolve()
    except Exception:  # recorded in the reason
        pass
    name = _state["backend"]
    lib = _libs[name]
    try:
        n_threads = threads()
    except Exception:  # pragma: no cover - threadpoolctl could not inspect the process
        n_threads = None
    return {
        "backend": name,
        "library": lib.library,
        "kernel": lib.kernel,
        "threads": n_threads,
        "int": "ILP64" if lib.ilp64 else "LP64",
        "filepath": lib.path,
        "reason": _state["reason"],
        "requested": _state["requested"],
        "calibration": _state["calibration"],
        "unavailable": dict(_load_errors),
        "gemm_kernel": {
            "mode": _kstate["mode"],
            "isa": _kstate["isa"],
            "float32": _routes_of(_kroutes_f),
            "float64": _routes_of(_kroutes_d),
            "ratios": dict(_kstate["ratios"]) if _kstate["ratios"] else None,
            "against": _kstate["against"],
            "reason": _kstate["reason"],
            "requested": _kstate["requested"],
            "row_split": _par_for != NULL,
        },
    }
