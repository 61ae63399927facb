# cython: language_level=3
"""Row-major GEMM and GEMV on raw pointers through the BLAS backend nnrt selected.

``gemm_rm``: C (m x n) = alpha * op(A) (m x k) @ op(B) (k x n) + beta * C;
``gemv_rm``: y = alpha * op(A) @ x + beta * y, A (m x n); op(A) = A (y has m
entries, x has n) or A.T (trans: y has n, x has m). All matrices row-major;
lda/ldb/ldc are the row lengths as stored; x and y are contiguous. With beta = 0
the output is not read (it may hold NaN).

The backend (numpy's OpenBLAS, MKL, scipy's OpenBLAS; ``NNRT_BLAS``, see
docs/performance.md "BLAS backends") is chosen once in nnrt/_blas.pyx and called
through function pointers held there: every module that cimports these helpers
uses the same selection. Callable without the GIL (for ``with nogil:`` blocks of
layer kernels); no Python per call. Every dimension must fit a C int.
"""

from cython cimport floating

from nnrt._blas cimport dgemm_rm, dgemv_rm, sgemm_rm, sgemv_rm


cdef inline void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                         floating alpha, const floating* a, int lda,
                         const floating* b, int ldb,
                         floating beta, floating* c, int ldc) noexcept nogil:
    if floating is float:
        sgemm_rm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    else:
        dgemm_rm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef inline void gemv_rm(bint trans, int m, int n, floating alpha, const floating* a, int lda,
                         const floating* x, floating beta, floating* y) noexcept nogil:
    if floating is float:
        sgemv_rm(trans, m, n, alpha, a, lda, x, beta, y)
    else:
        dgemv_rm(trans, m, n, alpha, a, lda, x, beta, y)
