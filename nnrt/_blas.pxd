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
