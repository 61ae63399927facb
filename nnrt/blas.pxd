# cython: language_level=3
"""Row-major GEMM and GEMV on raw pointers through scipy's BLAS (no linking of our own).

BLAS is column-major; a row-major C = op(A) @ op(B) is the column-major
C^T = op(B)^T @ op(A)^T, so the operands are swapped. Callable without the
GIL; for use inside ``with nogil:`` blocks of layer kernels.
"""

from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv


cdef inline void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                         floating alpha, const floating* a, int lda,
                         const floating* b, int ldb,
                         floating beta, floating* c, int ldc) noexcept nogil:
    # C (m x n, row-major, ld ldc) = alpha * op(A) (m x k) @ op(B) (k x n) + beta * C
    # lda/ldb are the row lengths of A and B as stored (row-major).
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'T' if trans_a else b'N'
    if floating is float:
        sgemm(&ta, &tb, &n, &m, &k, &alpha, <float*>b, &ldb, <float*>a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &n, &m, &k, &alpha, <double*>b, &ldb, <double*>a, &lda,
              &beta, c, &ldc)


cdef inline void gemv_rm(bint trans, int m, int n, floating alpha, const floating* a, int lda,
                         const floating* x, floating beta, floating* y) noexcept nogil:
    # y = alpha * op(A) @ x + beta * y, A (m x n, row-major, row length lda), unit strides:
    # op(A) = A (y has m entries) or A^T (trans: y has n entries). Row-major A is the
    # column-major A^T (n x m), so the BLAS transpose flag is the opposite of `trans`.
    cdef char t = b'N' if trans else b'T'
    cdef int one = 1
    if floating is float:
        sgemv(&t, &n, &m, &alpha, <float*>a, &lda, <float*>x, &one, &beta, y, &one)
    else:
        dgemv(&t, &n, &m, &alpha, <double*>a, &lda, <double*>x, &one, &beta, y, &one)
