# cython: language_level=3
"""C entry points of nnrt/_blas.pyx: row-major GEMM/GEMV through the BLAS backend in use.

Use them through nnrt/blas.pxd (``gemm_rm``/``gemv_rm`` over ``floating``). They are
exported through the module's C-API table, so every module that cimports them calls
the one copy here and sees the one backend selection (module globals of an inline
function in a .pxd would be per-module copies).
"""

cdef void sgemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                   float alpha, const float* a, int lda, const float* b, int ldb,
                   float beta, float* c, int ldc) noexcept nogil
cdef void dgemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                   double alpha, const double* a, int lda, const double* b, int ldb,
                   double beta, double* c, int ldc) noexcept nogil
cdef void sgemv_rm(bint trans, int m, int n, float alpha, const float* a, int lda,
                   const float* x, float beta, float* y) noexcept nogil
cdef void dgemv_rm(bint trans, int m, int n, double alpha, const double* a, int lda,
                   const double* x, double beta, double* y) noexcept nogil

# The thread count of the backend in use (OpenBLAS's or MKL's own calls): -1 when
# that backend has no C thread control (then threadpoolctl, from Python, is the way)
cdef int blas_get_threads() noexcept nogil
cdef int blas_set_threads(int n) noexcept nogil

# This thread's background prefetch queue (nnrt/_smallm.h: the training kernel prefetches
# one queued line every few steps of its inner loop): rows[0..n) of base, row_bytes each
# (the offsets are copied; base is only prefetched, never read). Returns the lines queued,
# -1 if out of memory. prefetch_clear(release): empty it (and free its offsets).
cdef Py_ssize_t prefetch_set(const char* base, const Py_ssize_t* rows, Py_ssize_t n,
                             Py_ssize_t row_bytes) noexcept nogil
cdef void prefetch_clear(int release) noexcept nogil
