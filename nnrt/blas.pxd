# cython: language_level=3
"""Row-major GEMM on raw pointers through scipy's BLAS (no linking of our own).

BLAS is column-major; a row-major C = op(A) @ op(B) is the column-major
C^T = op(B)^T @ op(A)^T, so the operands are swapped. Callable without the
GIL; for use inside ``with nogil:`` blocks of layer kernels.
"""

from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, sgemm


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
